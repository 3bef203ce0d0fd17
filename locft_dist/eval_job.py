"""``locft eval``: metrics of a base model, optionally with a delta added, on an edit file."""

from __future__ import annotations

import logging
from pathlib import Path

from locft_dist.delta import apply_delta_to_model, read_delta
from locft_dist.edits import load_edits
from locft_dist.evaluate import (
    EditMetrics,
    compute_reference,
    evaluate_edits,
    format_metrics_table,
    save_metrics,
)
from locft_dist.model import load_model, load_tokenizer
from locft_dist.parallel.single import pick_device

logger = logging.getLogger(__name__)


def run_eval(
    model_dir: str,
    edits_path: str,
    *,
    delta_path: str | None = None,
    json_out: str | None = None,
    edits_format: str = "auto",
    limit: int | None = None,
    batch_size: int = 64,
    generation: bool = True,
    heldout: list[str] | None = None,
    target_prefix: str = " ",
    device: str = "auto",
    dtype: str = "float32",
) -> dict[str, EditMetrics]:
    """Evaluate the base (and base + delta); locality compares against the base's own predictions."""
    requests = load_edits(edits_path, edits_format, limit=limit).requests
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=dtype).to(pick_device(device))
    kwargs = {"batch_size": batch_size, "generation": generation, "target_prefix": target_prefix}
    delta = read_delta(delta_path) if delta_path else None
    reference = compute_reference(model, tokenizer, requests, **kwargs) if delta else None
    base = evaluate_edits(model, tokenizer, requests, reference, heldout_texts=heldout, **kwargs)
    results = {"unedited": base}
    if delta is not None:
        apply_delta_to_model(model, delta, source=model_dir)
        results["edited"] = evaluate_edits(
            model,
            tokenizer,
            requests,
            reference,
            heldout_texts=heldout,
            perplexity_base=base.perplexity,
            **kwargs,
        )
    print(format_metrics_table(results, title=f"{model_dir} on {Path(edits_path).name}"))
    if json_out:
        save_metrics(json_out, {name: m.to_dict() for name, m in results.items()})
    return results
