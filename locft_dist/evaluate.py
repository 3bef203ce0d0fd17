"""Model-editing metrics: reliability, generalization, locality, edit score and perplexity.

Two definitions of each of the first three, since papers report both:

* **TF** (teacher-forced, EasyEdit): feed prompt + target ids and score the argmax at each target position.
  Locality is the agreement of those argmax tokens with the unedited model's (a ``Reference``).
* **EM** (greedy exact match, LocFT): decode greedily after the prompt, cut at the first newline or
  period, compare after SQuAD-style normalization. Locality compares with the unedited model's text.

All tokenization goes through ``edits.encode`` so evaluation and training agree on the prompt/target
boundary. The metrics are built from per-probe results reduced to (sum, count) pairs, so a sharded
evaluation can add the pairs across ranks before dividing; this module itself never talks to ranks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from locft_dist import outputs
from locft_dist.edits.encode import IGNORE_INDEX, EncodedExample, collate, encode_pair, pad_token_id
from locft_dist.edits.schema import EditRequest
from locft_dist.eval_generation import (
    batches,
    eval_mode,
    exact_match,
    generate_texts,
    model_device,
    normalize_answer,
    target_argmax,
)

__all__ = [
    "EditMetrics",
    "Reference",
    "compute_reference",
    "evaluate_edits",
    "exact_match",
    "format_metrics_table",
    "harmonic_mean",
    "normalize_answer",
    "perplexity_texts",
    "save_metrics",
]

Sums = dict[str, tuple[float, int]]


@dataclass
class Reference:
    """What the unedited model predicts on the locality probes; computed once, reused for every run.

    ``locality_ids[e][p]`` are the argmax ids at the answer positions of edit ``e``'s probe ``p`` and
    ``locality_texts[e][p]`` its greedy text (``None`` when computed without generation). The encoding
    settings are stored because the edited model must be probed at exactly the same positions.
    """

    locality_ids: list[list[list[int]]]
    locality_texts: list[list[str]] | None
    fingerprint: str
    target_prefix: str = " "
    max_length: int | None = None
    max_new_tokens: int | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Reference:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"unknown keys in a cached Reference: {sorted(unknown)}")
        return cls(**data)


@dataclass
class EditMetrics:
    """Means over edits (each edit weighs the same whatever its number of probes); ``None`` = not measured.

    ``num_rephrases`` and ``num_locality`` count probes; the ``num_edits_with_*`` fields count the edits
    that enter the generalization and locality means.
    """

    reliability_tf: float
    generalization_tf: float | None
    locality_tf: float | None
    reliability_em: float | None
    generalization_em: float | None
    locality_em: float | None
    edit_score_tf: float
    edit_score_em: float | None
    perplexity: float | None
    perplexity_base: float | None
    num_edits: int
    num_rephrases: int
    num_locality: int
    num_edits_with_rephrases: int = 0
    num_edits_with_locality: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def harmonic_mean(values: Iterable[float | None]) -> float:
    """Harmonic mean of the given components, skipping ``None`` (a component that was not measured).

    Zero if any component is zero: an edit method that destroys locality scores nothing.
    """
    present = [float(v) for v in values if v is not None]
    if not present:
        raise ValueError("harmonic_mean needs at least one value")
    if any(v < 0 for v in present):
        raise ValueError(f"harmonic_mean is defined for non-negative values, got {present}")
    if any(v == 0 for v in present):
        return 0.0
    return len(present) / sum(1.0 / v for v in present)


def _encode_all(tokenizer, pairs: Sequence[tuple[str, str]], target_prefix: str, max_length: int | None):
    return [
        encode_pair(
            tokenizer, prompt, answer, target_prefix=target_prefix, append_eos=False, max_length=max_length
        )
        for prompt, answer in pairs
    ]


def _locality_pairs(requests: Sequence[EditRequest]) -> tuple[list[int], list[tuple[str, str]]]:
    owners, pairs = [], []
    for edit, request in enumerate(requests):
        for probe in request.locality_prompts:
            owners.append(edit)
            pairs.append((probe.prompt, probe.answer))
    return owners, pairs


def _locality_fingerprint(requests: Sequence[EditRequest]) -> str:
    """Hash of the locality probes per edit: a cached Reference must line up with the requests."""
    digest = hashlib.sha256()
    for request in requests:
        probes = [[p.prompt, p.answer] for p in request.locality_prompts]
        digest.update(json.dumps(probes, ensure_ascii=False).encode("utf-8") + b"\n")
    return digest.hexdigest()[:16]


def _group(owners: Sequence[int], values: Sequence[Any], num_edits: int) -> list[list[Any]]:
    grouped: list[list[Any]] = [[] for _ in range(num_edits)]
    for edit, value in zip(owners, values, strict=True):
        grouped[edit].append(value)
    return grouped


def _per_edit_sum(owners: Sequence[int], scores: Sequence[float]) -> tuple[float, int]:
    """(sum over edits of the edit's mean probe score, number of edits with probes)."""
    by_edit: dict[int, list[float]] = {}
    for edit, score in zip(owners, scores, strict=True):
        by_edit.setdefault(edit, []).append(score)
    return sum(sum(v) / len(v) for v in by_edit.values()), len(by_edit)


def _accuracy(predicted: Sequence[int], example: EncodedExample) -> float:
    target = example.input_ids[example.num_prompt_tokens :]
    return sum(int(p == t) for p, t in zip(predicted, target, strict=True)) / len(target)


def _agreement(predicted: Sequence[int], reference: Sequence[int]) -> float:
    if len(predicted) != len(reference):
        raise ValueError("locality probe length differs from the Reference: recompute the Reference")
    return sum(int(p == r) for p, r in zip(predicted, reference, strict=True)) / len(reference)


def compute_reference(
    model,
    tokenizer,
    requests: Sequence[EditRequest],
    *,
    batch_size: int = 64,
    generation: bool = True,
    target_prefix: str = " ",
    max_length: int | None = None,
    max_new_tokens: int | None = None,
    progress: bool = False,
) -> Reference:
    """Run the unedited model on every locality probe; locality is agreement with this."""
    common = {"pad_id": pad_token_id(tokenizer), "batch_size": batch_size, "progress": progress}
    owners, pairs = _locality_pairs(requests)
    examples = _encode_all(tokenizer, pairs, target_prefix, max_length)
    with eval_mode(model):
        ids = target_argmax(model, examples, desc="reference tf", **common)
        texts = None
        if generation:
            texts = generate_texts(
                model, tokenizer, examples, max_new_tokens=max_new_tokens, desc="reference gen", **common
            )
    return Reference(
        locality_ids=_group(owners, ids, len(requests)),
        locality_texts=_group(owners, texts, len(requests)) if texts is not None else None,
        fingerprint=_locality_fingerprint(requests),
        target_prefix=target_prefix,
        max_length=max_length,
        max_new_tokens=max_new_tokens,
    )


def _edit_sums(
    model,
    tokenizer,
    requests: Sequence[EditRequest],
    reference: Reference | None,
    *,
    batch_size: int,
    generation: bool,
    target_prefix: str,
    max_new_tokens: int | None,
    progress: bool,
) -> Sums:
    """Per-metric (sum of per-edit means, number of edits), plus probe counts as (count, 1)."""
    pad_id = pad_token_id(tokenizer)
    common = {"pad_id": pad_id, "batch_size": batch_size, "progress": progress}
    owners = list(range(len(requests)))
    pairs = [(r.prompt, r.target_new) for r in requests]
    for edit, request in enumerate(requests):
        owners.extend([edit] * len(request.rephrase_prompts))
        pairs.extend((prompt, request.target_new) for prompt in request.rephrase_prompts)
    examples = _encode_all(tokenizer, pairs, target_prefix, None)
    num_edits = len(requests)
    sums: Sums = {"num_edits": (num_edits, 1), "num_rephrases": (len(pairs) - num_edits, 1)}

    predicted = target_argmax(model, examples, desc="edits tf", **common)
    accuracy = [_accuracy(p, e) for p, e in zip(predicted, examples, strict=True)]
    sums["reliability_tf"] = _per_edit_sum(owners[:num_edits], accuracy[:num_edits])
    sums["generalization_tf"] = _per_edit_sum(owners[num_edits:], accuracy[num_edits:])
    if generation:
        texts = generate_texts(
            model, tokenizer, examples, max_new_tokens=max_new_tokens, desc="edits gen", **common
        )
        hits = [float(exact_match(t, answer)) for t, (_, answer) in zip(texts, pairs, strict=True)]
        sums["reliability_em"] = _per_edit_sum(owners[:num_edits], hits[:num_edits])
        sums["generalization_em"] = _per_edit_sum(owners[num_edits:], hits[num_edits:])

    loc_owners, loc_pairs = _locality_pairs(requests)
    sums["num_locality"] = (len(loc_pairs), 1)
    if reference is None or not loc_pairs:
        return sums
    if reference.fingerprint != _locality_fingerprint(requests):
        raise ValueError("the Reference was computed for other locality probes; recompute it for these edits")
    if target_prefix != reference.target_prefix:
        warnings.warn(
            f"locality probes use the Reference's target_prefix {reference.target_prefix!r}, "
            f"not {target_prefix!r}, so they are probed at the same positions",
            stacklevel=3,
        )
    loc_examples = _encode_all(tokenizer, loc_pairs, reference.target_prefix, reference.max_length)
    ref_ids = [ids for per_edit in reference.locality_ids for ids in per_edit]
    predicted = target_argmax(model, loc_examples, desc="locality tf", **common)
    agreement = [_agreement(p, r) for p, r in zip(predicted, ref_ids, strict=True)]
    sums["locality_tf"] = _per_edit_sum(loc_owners, agreement)
    if generation and reference.locality_texts is None:
        warnings.warn("the Reference holds no generations; locality_em is not measured", stacklevel=3)
    elif generation:
        limit = reference.max_new_tokens
        texts = generate_texts(
            model, tokenizer, loc_examples, max_new_tokens=limit, desc="locality gen", **common
        )
        ref_texts = [t for per_edit in reference.locality_texts for t in per_edit]
        same = [float(exact_match(t, r)) for t, r in zip(texts, ref_texts, strict=True)]
        sums["locality_em"] = _per_edit_sum(loc_owners, same)
    return sums


def _metrics_from_sums(sums: Sums, perplexity: float | None, perplexity_base: float | None) -> EditMetrics:
    def mean(key: str) -> float | None:
        total, count = sums.get(key, (0.0, 0))
        return total / count if count else None

    reliability_tf = mean("reliability_tf")
    assert reliability_tf is not None, "every edit has a reliability probe"
    tf = (reliability_tf, mean("generalization_tf"), mean("locality_tf"))
    em = (mean("reliability_em"), mean("generalization_em"), mean("locality_em"))
    return EditMetrics(
        reliability_tf=tf[0],
        generalization_tf=tf[1],
        locality_tf=tf[2],
        reliability_em=em[0],
        generalization_em=em[1],
        locality_em=em[2],
        edit_score_tf=harmonic_mean(tf),
        edit_score_em=harmonic_mean(em) if em[0] is not None else None,
        perplexity=perplexity,
        perplexity_base=perplexity_base,
        num_edits=int(sums["num_edits"][0]),
        num_rephrases=int(sums["num_rephrases"][0]),
        num_locality=int(sums["num_locality"][0]),
        num_edits_with_rephrases=sums["generalization_tf"][1],
        num_edits_with_locality=sums.get("locality_tf", (0.0, 0))[1],
    )


def evaluate_edits(
    model,
    tokenizer,
    requests: Sequence[EditRequest],
    reference: Reference | None,
    *,
    batch_size: int = 64,
    generation: bool = True,
    target_prefix: str = " ",
    heldout_texts: Sequence[str] | None = None,
    perplexity_base: float | None = None,
    max_new_tokens: int | None = None,
    progress: bool = False,
) -> EditMetrics:
    """All metrics of an edited model; locality needs the unedited model's ``reference``.

    ``max_new_tokens`` bounds greedy decoding on the edit prompts; locality probes decode with the
    Reference's own settings so both models are compared like for like. ``perplexity`` is measured on
    ``heldout_texts`` when given; ``perplexity_base`` is passed through (measure it once on the base
    model with ``perplexity_texts``).
    """
    if not requests:
        raise ValueError("evaluate_edits needs at least one edit request")
    if reference is not None and len(reference.locality_ids) != len(requests):
        raise ValueError(
            f"the Reference covers {len(reference.locality_ids)} edits, not {len(requests)}; recompute it"
        )
    with eval_mode(model):
        sums = _edit_sums(
            model,
            tokenizer,
            requests,
            reference,
            batch_size=batch_size,
            generation=generation,
            target_prefix=target_prefix,
            max_new_tokens=max_new_tokens,
            progress=progress,
        )
        perplexity = None
        if heldout_texts:
            perplexity = math.exp(_mean_nll(model, tokenizer, heldout_texts, batch_size=batch_size))
    return _metrics_from_sums(sums, perplexity, perplexity_base)


def _nll_sums(model, tokenizer, texts: Sequence[str], *, batch_size: int) -> tuple[float, int]:
    """(summed NLL in float32, number of predicted tokens) over every token after each text's first."""
    pad_id = pad_token_id(tokenizer)
    device = model_device(model)
    examples = [EncodedExample(tuple(tokenizer(t)["input_ids"]), 1) for t in texts]
    examples = [e for e in examples if len(e.input_ids) > 1]
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    total, count = 0.0, 0
    for batch in batches(order, batch_size):
        inputs = collate([examples[i] for i in batch], pad_id)
        logits = model(
            input_ids=inputs["input_ids"].to(device), attention_mask=inputs["attention_mask"].to(device)
        ).logits
        labels = inputs["labels"][:, 1:].to(device)
        total += torch.nn.functional.cross_entropy(
            logits[:, :-1, :].float().reshape(-1, logits.size(-1)),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        ).item()
        count += int((labels != IGNORE_INDEX).sum())
    return total, count


def _mean_nll(model, tokenizer, texts: Sequence[str], *, batch_size: int) -> float:
    total, count = _nll_sums(model, tokenizer, texts, batch_size=batch_size)
    if count == 0:
        raise ValueError("perplexity needs at least one text of two or more tokens")
    return total / count


def perplexity_texts(model, tokenizer, texts: Sequence[str], *, batch_size: int = 64) -> float:
    """Token-level perplexity, exp(mean NLL), pooled over all texts (long texts weigh more)."""
    with eval_mode(model):
        return math.exp(_mean_nll(model, tokenizer, texts, batch_size=batch_size))


_TABLE_ROWS = (
    ("Reliability TF", "reliability_tf"),
    ("Generalization TF", "generalization_tf"),
    ("Locality TF", "locality_tf"),
    ("Edit score TF", "edit_score_tf"),
    ("Reliability EM", "reliability_em"),
    ("Generalization EM", "generalization_em"),
    ("Locality EM", "locality_em"),
    ("Edit score EM", "edit_score_em"),
    ("Perplexity", "perplexity"),
    ("Perplexity (base)", "perplexity_base"),
    ("Edits", "num_edits"),
    ("Rephrase probes", "num_rephrases"),
    ("Locality probes", "num_locality"),
)


def _format_value(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def format_metrics_table(columns: dict[str, EditMetrics | dict[str, Any]], title: str | None = None) -> str:
    """A fixed-width table, one row per metric and one column per run, for logs and the demo."""
    dicts = {name: m.to_dict() if isinstance(m, EditMetrics) else dict(m) for name, m in columns.items()}
    header = ["metric", *dicts]
    rows = [[label, *(_format_value(d.get(key)) for d in dicts.values())] for label, key in _TABLE_ROWS]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))])

    rule = "-" * len(line(header))
    lines = ([title] if title else []) + [line(header), rule, *(line(r) for r in rows)]
    return "\n".join(lines)


def save_metrics(path: str | Path, metrics: dict[str, Any]) -> None:
    """Write metrics as JSON atomically (temp file + rename): a killed job never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def default(value: Any) -> Any:
        if isinstance(value, EditMetrics):
            return value.to_dict()
        if isinstance(value, Reference):
            return value.to_json()
        raise TypeError(f"cannot write {type(value).__name__} to metrics JSON")

    outputs.write_text(path, json.dumps(metrics, indent=2, sort_keys=True, default=default) + "\n")
