"""Is a rerun the same run? Compare what changes the trained weights; allow (and log) everything else.

A run is identified by its resolved paths, the content fingerprints of its model and edits, and the config
keys that change results (learning rate, location, encoding, epochs, ...). Keys that only change how the
run is carried out (logging, progress, micro-batch and cache budgets, checkpoint cadence, evaluation batch
size, the strategy) may differ between attempts: a rerun with them changed continues the run and logs what
changed. A rerun that would not reproduce the run is refused with every differing key, both values and a
way out that keeps the checkpoints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from locft_dist.config import RunConfig, all_keys
from locft_dist.errors import ConfigError

logger = logging.getLogger(__name__)

PATH_KEYS = (
    "model.path",
    "edits.path",
    "edits.token_cache_dir",
    "train.prefix_cache_spill_dir",
    "augment.locality_path",
    "dist.deepspeed_config",
    "eval.heldout_path",
    "continual.previous",
    "output.dir",
)
"""Config keys holding paths: made absolute against the working directory when a run starts."""

NEUTRAL_PREFIXES = ("logging.", "eval.")
"""Whole sections that never change the trained weights (evaluation settings are checked per phase)."""
NEUTRAL_KEYS = frozenset(
    {
        "model.device",
        "edits.token_cache",
        "edits.token_cache_dir",
        "train.progress",
        "train.micro_batch_size",
        "train.micro_batch_tokens",
        "train.micro_batch_pass_cost",
        "train.prefix_cache",
        "train.prefix_cache_device_gib",
        "train.prefix_cache_offload_prefix",
        "train.prefix_cache_host_gib",
        "train.prefix_cache_spill_dir",
        "dist.strategy",
        "dist.timeout_minutes",
        "output.dir",
        "output.checkpoint_every",
        "output.keep_last",
        "output.overwrite",
        "continual.eval_limit",
        "continual.keep_facts",
    }
)
"""Keys that change how a run is carried out, not its results (float summation order at most, < 1e-5)."""
CONTENT_KEYS = {
    "model.path": "model",
    "edits.path": "edits",
    "edits.format": "edits",
    "edits.limit": "edits",
    "edits.skip_invalid": "edits",
}
"""Keys whose effect the content fingerprint of the model or of the loaded edits captures exactly."""

_SAMPLES, _SAMPLE_BYTES = 16, 1 << 16
_SMALL_FILE = 64 << 20


def resolve_paths(cfg: RunConfig) -> RunConfig:
    """A copy of ``cfg`` with every path absolute (``~`` expanded, ``.``/``..`` folded)."""
    cfg = dataclasses.replace(cfg, **{f.name: dataclasses.replace(getattr(cfg, f.name)) for f in _sections()})
    for key in PATH_KEYS:
        section, leaf = key.split(".")
        value = getattr(getattr(cfg, section), leaf)
        if value:
            setattr(getattr(cfg, section), leaf, os.path.abspath(os.path.expanduser(str(value))))
    return cfg


def _sections() -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(RunConfig)


def model_fingerprint(model_dir: str | Path) -> str:
    """Content hash of a model directory without reading all its weights.

    Small files (config, tokenizer, index) are hashed whole; each ``.safetensors`` file contributes its
    size, its header (names, dtypes, shapes, offsets) and 16 evenly spaced 64 KiB blocks of its data, so a
    different checkpoint of the same architecture is told apart while a 140 GB model costs ~1 MiB of reads
    per file. The exact values of the localized tensors are checked separately (the base fingerprint).
    """
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}\n".encode())
        with open(path, "rb") as handle:
            if path.suffix != ".safetensors":
                if size <= _SMALL_FILE:
                    digest.update(handle.read())
                continue
            (header_len,) = struct.unpack("<Q", handle.read(8))
            digest.update(handle.read(header_len))
            start = 8 + header_len
            step = max((size - start) // _SAMPLES, 1)
            for offset in range(start, size, step)[:_SAMPLES]:
                handle.seek(offset)
                digest.update(handle.read(_SAMPLE_BYTES))
    return digest.hexdigest()[:32]


@dataclass(frozen=True)
class Identity:
    """What a run was made from: the content fingerprints of its model and of its loaded edits."""

    model: str
    edits: str

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclass
class Comparison:
    """Differences between a run directory's run and a new attempt, as (key, in the run, now)."""

    refused: list[tuple[str, Any, Any]]
    allowed: list[tuple[str, Any, Any]]


def flat_config(tree: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys of a config tree, missing keys filled with today's defaults (older runs lack new keys)."""
    flat = _flatten(dataclasses.asdict(RunConfig()))
    known = set(all_keys())
    for key, value in _flatten(tree).items():
        if key in known:
            flat[key] = value
        else:
            logger.info("ignoring config key %r of the earlier run (not a key of this version)", key)
    return flat


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _same_path(a: Any, b: Any) -> bool:
    if not a or not b:
        return a == b
    return os.path.realpath(os.path.expanduser(str(a))) == os.path.realpath(os.path.expanduser(str(b)))


def compare(
    previous: dict[str, Any],
    previous_identity: Identity | None,
    current: dict[str, Any],
    identity: Identity,
) -> Comparison:
    """Classify every difference between two flat configs (and identities) as refused or allowed."""
    result = Comparison([], [])
    for key in sorted(set(previous) | set(current)):
        old, new = previous.get(key), current.get(key)
        if key in PATH_KEYS and _same_path(old, new):
            continue
        if old == new:
            continue
        neutral = key in NEUTRAL_KEYS or key.startswith(NEUTRAL_PREFIXES)
        covered = key in CONTENT_KEYS and previous_identity is not None
        (result.allowed if neutral or covered else result.refused).append((key, old, new))
    if previous_identity is not None:
        for name in ("model", "edits"):
            old, new = getattr(previous_identity, name), getattr(identity, name)
            if old != new:
                where = f" ({current[f'{name}.path']})" if current.get(f"{name}.path") else ""
                result.refused.append((f"{name} content{where}", f"fingerprint {old}", f"fingerprint {new}"))
    return result


def check_compatible(run_dir: Path, comparison: Comparison) -> None:
    """Refuse naming each differing key, or log what changed and continue."""
    if comparison.refused:
        lines = "\n".join(f"  {key}: {old!r} in the run, {new!r} now" for key, old, new in comparison.refused)
        raise ConfigError(
            f"{run_dir} holds a run that these settings would not reproduce:\n{lines}\n"
            f"Nothing was changed; its checkpoints are kept. To continue that run: locft edit --config "
            f"{run_dir / 'config.yaml'}; to run these settings: another output.dir (or output.overwrite=true "
            "to replace that run, deleting its checkpoints)."
        )
    if comparison.allowed:
        logger.info(
            "continuing the run in %s; changed since its last attempt (results unaffected): %s",
            run_dir,
            "; ".join(f"{key} {old!r} -> {new!r}" for key, old, new in comparison.allowed),
        )
