"""``locft eval``: metrics of a base model, optionally with a delta added, on an edit file.

The columns are those of ``locft edit``: the unedited model scored against its own predictions (locality
1.0, edit score over three metrics), and the edited one. A model written by ``locft apply`` is the edited
one: its recorded base, when still present, gives the unedited column and the locality reference.
"""

from __future__ import annotations

import logging
from pathlib import Path

from locft_dist import outputs
from locft_dist.delta import (
    applied_record,
    apply_delta_to_model,
    fingerprint_tensors,
    read_base_tensors,
    read_delta,
)
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
    skip_invalid: bool = False,
    batch_size: int = 64,
    generation: bool = True,
    heldout: list[str] | None = None,
    target_prefix: str = " ",
    device: str = "auto",
    dtype: str = "float32",
) -> dict[str, EditMetrics]:
    """Evaluate the base (and base + delta); locality compares against the base's own predictions."""
    if json_out:
        outputs.check_writable(json_out, "--json")  # before the evaluation, not after it
    requests = load_edits(edits_path, edits_format, limit=limit, skip_invalid=skip_invalid).requests
    tokenizer = load_tokenizer(model_dir)
    kwargs = {"batch_size": batch_size, "generation": generation, "target_prefix": target_prefix}
    delta = read_delta(delta_path) if delta_path else None
    edited_dir = None
    if delta is None and (base_dir := _applied_base(model_dir)) != model_dir:
        model_dir, edited_dir = base_dir, model_dir
    results: dict[str, EditMetrics] = {}
    reference = None
    if model_dir is not None:
        model = load_model(model_dir, dtype=dtype).to(pick_device(device))
        reference = compute_reference(model, tokenizer, requests, **kwargs)
        results["unedited"] = evaluate_edits(
            model, tokenizer, requests, reference, heldout_texts=heldout, **kwargs
        )
        if delta is not None:
            apply_delta_to_model(model, delta, source=model_dir)
            edited_dir = model_dir
        else:
            del model
    if edited_dir is not None:
        if delta is None:
            model = load_model(edited_dir, dtype=dtype).to(pick_device(device))
        base = results.get("unedited")
        results["edited"] = evaluate_edits(
            model,
            tokenizer,
            requests,
            reference,
            heldout_texts=heldout,
            perplexity_base=base.perplexity if base else None,
            **kwargs,
        )
    print(format_metrics_table(results, title=f"{edited_dir or model_dir} on {Path(edits_path).name}"))
    if json_out:
        save_metrics(json_out, {name: m.to_dict() for name, m in results.items()})
    return results


def _applied_base(model_dir: str) -> str | None:
    """The base of a model written by ``locft apply`` if it is still there unchanged, None if it is gone,
    or ``model_dir`` itself for any other model."""
    record = applied_record(model_dir)
    if record is None:
        return model_dir
    base = record.get("base_model")
    try:
        found = fingerprint_tensors(read_base_tensors(base, list(record["tensors"])))
    except (OSError, ValueError, KeyError, TypeError) as err:  # moved or deleted: no locality reference
        logger.warning(
            "%s was edited from %s, which cannot be read (%s): locality is not measured", model_dir, base, err
        )
        return None
    if found != record["metadata"].get("locft.base_fingerprint"):
        logger.warning(
            "%s was edited from %s, which has changed since: locality is not measured", model_dir, base
        )
        return None
    logger.info("%s is %s edited by %s: evaluating both", model_dir, base, record.get("delta"))
    return base
