"""The augmentation cached in the run directory: one safetensors file of flat arrays, written atomically.

A run with locality supervision on 100K edits keeps ~100K x tokens x top-k soft targets; as Python tuples of
floats (or JSON lists) that is hundreds of MiB and minutes to parse. Here they are two ``[tokens, k]``
tensors (int32 ids, float32 probabilities) that the examples view into, next to the locality examples' ids
(flat, with offsets) and the sampled paraphrase prefixes (UTF-8 bytes, with offsets).

Metadata: ``locft.format`` = ``locft-augment/2`` and ``locft.key`` (what the examples depend on: a file
with another key is regenerated, not read).
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from locft_dist.edits.encode import EncodedExample

FORMAT = "locft-augment/2"
FILE = "augment.safetensors"


@dataclass
class Generated:
    """What the unedited model produced: paraphrase prefixes (in edit order) and locality examples."""

    prefixes: list[str]
    locality: list[EncodedExample]


def _flat(rows: Sequence[Sequence[int]], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.zeros(len(rows) + 1, dtype=torch.int64)
    if rows:
        offsets[1:] = torch.tensor([len(r) for r in rows], dtype=torch.int64).cumsum(0)
    flat = torch.tensor([v for r in rows for v in r], dtype=dtype)
    return flat, offsets


def save(path: Path, key: str, generated: Generated) -> None:
    """Write to a temporary file beside ``path``, then rename (a reader never sees half a file)."""
    prefix_bytes, prefix_offsets = _flat([list(p.encode("utf-8")) for p in generated.prefixes], torch.uint8)
    ids, offsets = _flat([e.input_ids for e in generated.locality], torch.int32)
    soft = [e for e in generated.locality if e.soft_ids is not None]
    tensors = {
        "prefix_bytes": prefix_bytes,
        "prefix_offsets": prefix_offsets,
        "locality_ids": ids,
        "locality_offsets": offsets,
        "locality_num_prompt": torch.tensor(
            [e.num_prompt_tokens for e in generated.locality], dtype=torch.int32
        ),
    }
    if soft:
        assert len(soft) == len(generated.locality), "soft targets for every locality example or none"
        tensors["soft_ids"] = torch.cat([e.soft_ids for e in soft]).to(torch.int32)
        tensors["soft_probs"] = torch.cat([e.soft_probs for e in soft]).to(torch.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"locft.format": FORMAT, "locft.key": key})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(path: Path, key: str) -> Generated | None:
    """The cached generation, or None when ``path`` is absent, unreadable or made for another key."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("locft.format") != FORMAT or metadata.get("locft.key") != key:
            return None
        tensors = load_file(str(path))
    except (OSError, SafetensorError):
        return None
    raw, cuts = tensors["prefix_bytes"].numpy().tobytes(), tensors["prefix_offsets"].tolist()
    prefixes = [raw[a:b].decode("utf-8") for a, b in itertools.pairwise(cuts)]
    ids, offsets = tensors["locality_ids"], tensors["locality_offsets"].tolist()
    num_prompt = tensors["locality_num_prompt"].tolist()
    soft_ids, soft_probs = tensors.get("soft_ids"), tensors.get("soft_probs")
    locality, row = [], 0
    for i, (start, stop) in enumerate(itertools.pairwise(offsets)):
        example = EncodedExample(tuple(ids[start:stop].tolist()), num_prompt[i])
        if soft_ids is not None and soft_probs is not None:
            n = example.num_target_tokens
            example = EncodedExample(
                example.input_ids,
                example.num_prompt_tokens,
                soft_ids=soft_ids[row : row + n],
                soft_probs=soft_probs[row : row + n],
            )
            row += n
        locality.append(example)
    return Generated(prefixes, locality)
