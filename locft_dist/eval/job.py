"""``locft eval``: metrics of a base model, optionally with a delta added, on an edit file.

    locft eval --model DIR --edits FILE [--delta FILE] [--json OUT] [--dtype bfloat16]
    torchrun --nproc_per_node 2 -m locft_dist.cli eval --model DIR --edits FILE --delta FILE   # FSDP2

With a delta, everything that decides what is measured comes from the run that made it: the encoding
(target prefix, chat template, max length) from the delta's ``locft.encoding`` and WILD's token budget
from its config; flags fill in only what a delta does not say. Cheap checks come before any model pass:
the delta's base fingerprint against the model directory's tensors, the edit file, the ``--json``
destination. Under several processes the model is sharded with FSDP2 and each rank evaluates its share.

A model written by ``locft apply`` is the edited one: when its recorded base is still there unchanged,
the base is evaluated as the unedited column (the locality reference) and the edited tensors' difference
is added to it, so both columns come from one load; when the base is gone, only the edited column is
reported and locality is not measured.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path

from locft_dist import outputs
from locft_dist.config import LocateConfig, RunConfig
from locft_dist.delta import (
    Delta,
    applied_record,
    check_base,
    fingerprint_tensors,
    read_base_tensors,
    read_delta,
)
from locft_dist.edits import load_edits
from locft_dist.edits.encode import Encoding
from locft_dist.errors import ConfigError
from locft_dist.eval.evaluate import EvalSettings, Evaluator
from locft_dist.eval.metrics import EditMetrics
from locft_dist.eval.table import format_metrics_table, save_metrics
from locft_dist.model import DTYPES, check_model_dir, load_tokenizer
from locft_dist.parallel import make_strategy
from locft_dist.subject_rows import untie_for_delta

logger = logging.getLogger(__name__)

_LAYER_PARAMETER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)\.(?:weight|bias)$")


@dataclass(frozen=True)
class EncodingFlags:
    """Encoding options given on the command line (None: not given)."""

    target_prefix: str | None = None
    chat_template: str | None = None
    max_length: int | None = None


def resolve_encoding(delta: Delta | None, flags: EncodingFlags) -> Encoding:
    """The delta's encoding when it records one (a flag that disagrees is ignored, with a warning); else
    the flags over the defaults."""
    given = {k: v for k, v in vars(flags).items() if v is not None}
    recorded = delta.encoding if delta is not None else None
    if recorded is None:
        return replace(Encoding(), **given)
    for key, value in given.items():
        if getattr(recorded, key) != value:
            logger.warning(
                "--%s %r is ignored: the delta was trained with %s=%r",
                key.replace("_", "-"),
                value,
                key,
                getattr(recorded, key),
            )
    return recorded


def _run_setting(delta: Delta | None, section: str, key: str):
    """A setting of the run that made the delta (from its recorded config), or None."""
    if delta is None:
        return None
    try:
        return json.loads(delta.metadata.get("locft.config", "{}")).get(section, {}).get(key)
    except (json.JSONDecodeError, AttributeError):
        return None


def _location(delta: Delta | None) -> LocateConfig:
    """Where the delta's tensors sit (FSDP keeps them in float32, as training did); the default without."""
    if delta is None:
        return LocateConfig()
    if _subject_embeddings(delta):
        return LocateConfig(subject_embeddings=True)
    layers, modules = set(), set()
    for name in delta.tensors:
        match = _LAYER_PARAMETER.search(name)
        if match is None:
            raise ConfigError(f"the delta tensor {name!r} is not inside a decoder layer")
        layers.add(int(match.group(1)))
        modules.add(match.group(2))
    return LocateConfig(layers=sorted(layers), modules=sorted(modules))


def _subject_embeddings(delta: Delta) -> bool:
    """Whether the delta moves input-embedding rows (``locate.subject_embeddings``), not decoder layers."""
    try:
        locate = json.loads(delta.metadata.get("locft.config", "{}")).get("locate", {})
    except (json.JSONDecodeError, AttributeError):
        return False
    return isinstance(locate, dict) and bool(locate.get("subject_embeddings"))


def run_eval(
    model_dir: str,
    edits_path: str,
    *,
    delta_path: str | None = None,
    json_out: str | None = None,
    edits_format: str = "auto",
    limit: int | None = None,
    skip_invalid: bool = False,
    batch_size: int = 256,
    generation: bool = True,
    max_new_tokens: int | None = None,
    heldout: list[str] | None = None,
    encoding_flags: EncodingFlags | None = None,
    device: str = "auto",
    dtype: str = "float32",
    strategy: str = "auto",
) -> dict[str, EditMetrics]:
    """Evaluate the base (and base + delta); locality compares against the base's own predictions."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if strategy not in ("auto", "none", "fsdp"):
        raise ConfigError(f"--strategy {strategy!r}: locft eval runs with auto, none or fsdp")
    check_model_dir(model_dir)
    if json_out:
        outputs.check_writable(json_out, "--json")  # before the evaluation, not after it
    delta = read_delta(delta_path) if delta_path else None
    shown_dir, base_known = model_dir, True
    if delta is None and (applied := applied_delta(model_dir)) is not None:
        model_dir, delta = applied  # the base, plus what apply added to it
    elif delta is None and applied_record(model_dir) is not None:
        base_known = False
    if delta is not None:  # before anything is loaded or run
        check_base(delta, read_base_tensors(model_dir, list(delta.tensors)), str(model_dir))
    encoding = resolve_encoding(delta, encoding_flags or EncodingFlags())
    if max_new_tokens is None:
        max_new_tokens = _run_setting(delta, "eval", "max_new_tokens") or EvalSettings().max_new_tokens
    requests = load_edits(edits_path, edits_format, limit=limit, skip_invalid=skip_invalid).requests
    tokenizer = load_tokenizer(model_dir)

    cfg = RunConfig()
    cfg.model.path, cfg.model.dtype, cfg.model.device = str(model_dir), dtype, device
    cfg.dist.strategy = strategy
    ranks = make_strategy(cfg)
    if delta is not None and _subject_embeddings(delta) and ranks.world_size != 1:
        ranks.close()
        raise ConfigError(
            f"{delta_path or model_dir}: a locate.subject_embeddings delta is evaluated in one process "
            f"(--strategy none), not {ranks.world_size}"
        )
    try:
        model, _ = ranks.load_model(cfg.model, _location(delta))
        settings = EvalSettings(batch_size=batch_size, generation=generation, max_new_tokens=max_new_tokens)
        evaluator = Evaluator(
            tokenizer, requests, encoding=encoding, settings=settings, ranks=ranks, source=edits_path
        )
        if delta is None:
            if base_known:  # scored against its own predictions, as `locft edit` scores the unedited model
                results = {"unedited": evaluator.unedited(model, heldout)[1]}
            else:
                results = {"edited": _without_locality(evaluator.edited(model, None, heldout))}
        else:
            from locft_dist.parallel.add_tensors import add_to_parameters

            reference, base = evaluator.unedited(model, heldout)
            untie_for_delta(model, delta.metadata)
            add_to_parameters(model, delta.tensors)
            edited = evaluator.edited(model, reference, heldout, perplexity_base=base.perplexity)
            results = {"unedited": base, "edited": edited}
        if ranks.is_main:
            print(format_metrics_table(results, title=f"{shown_dir} on {Path(edits_path).name}"))
            if json_out:
                save_metrics(json_out, {name: m.to_dict() for name, m in results.items()})
        ranks.barrier()
        return results
    finally:
        ranks.close()


def applied_delta(model_dir: str) -> tuple[str, Delta] | None:
    """For a model written by ``locft apply`` whose base is still there unchanged: (base directory, the
    difference of the edited tensors, carrying the applied delta's metadata). None for any other model,
    or when the base is gone or changed (a warning says locality is not measured)."""
    record = applied_record(model_dir)
    if record is None:
        return None
    base = record.get("base_model")
    try:
        names = list(record["tensors"])
        base_tensors = read_base_tensors(base, names)
        if fingerprint_tensors(base_tensors) != record["metadata"].get("locft.base_fingerprint"):
            logger.warning(
                "%s was edited from %s, which has changed since: locality is not measured", model_dir, base
            )
            return None
        edited = read_base_tensors(model_dir, names)
    except (OSError, ValueError, KeyError, TypeError) as err:  # moved or deleted: no locality reference
        logger.warning(
            "%s was edited from %s, which cannot be read (%s): locality is not measured", model_dir, base, err
        )
        return None
    logger.info("%s is %s edited by %s: evaluating both", model_dir, base, record.get("delta"))
    difference = {name: edited[name].float() - base_tensors[name].float() for name in names}
    return str(base), Delta(tensors=difference, metadata=dict(record["metadata"]))


def _without_locality(metrics: EditMetrics) -> EditMetrics:
    """An edited model without its base: locality, and the edit scores that include it, are not measured."""
    return replace(
        metrics,
        locality_tf=None,
        locality_em=None,
        locality_wild=None,
        edit_score_tf=None,
        edit_score_em=None,
        edit_score_wild=None,
        num_edits_with_locality=0,
    )
