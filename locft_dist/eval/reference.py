"""The unedited model's predictions on the locality probes: computed once, kept in the run directory.

Locality compares the edited model with the unedited one, so the unedited model's teacher-forced argmax
and greedy tokens on every locality probe are the ``Reference``. It is held in the probes' global order
(edit by edit), whatever the number of ranks that computed it: each rank fills in its own edits and a sum
over ranks assembles the whole, so a run resumed on another world size reads the same file.

``output.dir/reference.safetensors`` stores it with the unedited model's own metrics; its ``key`` covers
the model (its config, weight file headers and the edited tensors' fingerprint), the probes (texts,
encoding, tokenizer) and the generation settings, and a file with another key is recomputed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from locft_dist import outputs
from locft_dist.eval.generate import Ranks

FORMAT = "locft-reference/1"
FILE_NAME = "reference.safetensors"


@dataclass
class Reference:
    """Row ``s`` holds locality probe ``s`` (edits in order, each edit's probes in order)."""

    predicted: list[list[int]]
    """Teacher-forced argmax at the answer positions."""
    generated: list[list[int]] | None
    """Greedy tokens (None when computed without generation)."""
    probes_key: str
    """``ProbeSet.key`` of the probes it was computed on."""
    max_new_tokens: int | None
    """The WILD budget its generations ran to."""
    key: str = ""
    """Everything it depends on (model, probes, settings); set when stored in a run directory."""
    metrics: dict[str, Any] | None = field(default=None)
    """The unedited model's own metrics on the same probes (``EditMetrics.to_dict()``), if computed."""
    deferred: bool = False
    """The locality generations were not stored: the edited pass decodes the unedited model beside the
    edited one (paired decoding, one process) and compares them there."""

    def check(self, probes_key: str, num_locality: int, generation: bool, max_new_tokens: int) -> None:
        """Refuse a Reference made for other probes or a shorter generation budget."""
        if self.probes_key != probes_key or len(self.predicted) != num_locality:
            raise ValueError(
                "the Reference was computed for other locality probes; recompute it for these edits"
            )
        if generation and self.generated is None and not self.deferred:
            raise ValueError("the Reference holds no generations; compute it with generation on")
        if generation and (self.max_new_tokens or 0) < max_new_tokens:
            raise ValueError(
                f"the Reference generated up to {self.max_new_tokens} tokens, fewer than max_new_tokens="
                f"{max_new_tokens}; recompute it"
            )


def gather_rows(
    rows: Mapping[int, Sequence[int]], num_rows: int, ranks: Ranks, device: torch.device
) -> list[list[int]]:
    """All ranks' rows in global order: each rank holds some of ``num_rows`` ragged int rows; two sums
    (lengths, then values at their offsets) give every rank all of them."""
    lengths = torch.zeros(num_rows, dtype=torch.long)
    for row, values in rows.items():
        lengths[row] = len(values)
    if ranks.world_size > 1:
        lengths = ranks.all_reduce_sum(lengths.to(device)).cpu()
    offsets = torch.zeros(num_rows + 1, dtype=torch.long)
    offsets[1:] = lengths.cumsum(0)
    flat = torch.zeros(int(offsets[-1]), dtype=torch.long)
    for row, values in rows.items():
        flat[offsets[row] : offsets[row + 1]] = torch.tensor(list(values), dtype=torch.long)
    if ranks.world_size > 1:
        flat = ranks.all_reduce_sum(flat.to(device)).cpu()
    return [flat[offsets[i] : offsets[i + 1]].tolist() for i in range(num_rows)]


def _pack(rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    offsets = torch.zeros(len(rows) + 1, dtype=torch.long)
    offsets[1:] = lengths.cumsum(0)
    flat = torch.tensor([v for r in rows for v in r], dtype=torch.int64)
    return flat, offsets


def _unpack(flat: torch.Tensor, offsets: torch.Tensor) -> list[list[int]]:
    values, bounds = flat.tolist(), offsets.tolist()
    return [values[bounds[i] : bounds[i + 1]] for i in range(len(bounds) - 1)]


def save_reference(path: str | Path, reference: Reference) -> Path:
    """Write atomically (temp file in the same directory, then rename)."""
    path = Path(path)
    tensors = {}
    tensors["predicted"], tensors["predicted_offsets"] = _pack(reference.predicted)
    if reference.generated is not None:
        tensors["generated"], tensors["generated_offsets"] = _pack(reference.generated)
    metadata = {
        "locft.format": FORMAT,
        "locft.key": reference.key,
        "locft.probes_key": reference.probes_key,
        "locft.max_new_tokens": json.dumps(reference.max_new_tokens),
        "locft.metrics": json.dumps(reference.metrics),
        "locft.deferred": json.dumps(reference.deferred),
    }
    with outputs.atomic_path(path) as tmp:  # the umask's mode, renamed into place when complete
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def load_reference(path: str | Path, key: str) -> Reference | None:
    """The stored Reference if it exists and was made for ``key``; None otherwise (then recompute it).

    A file that is not a readable reference is an error naming it: it is never silently replaced.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            if metadata.get("locft.format") != FORMAT:
                raise ValueError(
                    f"metadata 'locft.format' is {metadata.get('locft.format')!r}, not {FORMAT!r}"
                )
            if metadata.get("locft.key") != key:
                return None
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        generated = None
        if "generated" in tensors:
            generated = _unpack(tensors["generated"], tensors["generated_offsets"])
        return Reference(
            predicted=_unpack(tensors["predicted"], tensors["predicted_offsets"]),
            generated=generated,
            probes_key=metadata["locft.probes_key"],
            max_new_tokens=json.loads(metadata["locft.max_new_tokens"]),
            key=key,
            metrics=json.loads(metadata["locft.metrics"]),
            deferred=bool(json.loads(metadata.get("locft.deferred", "false"))),
        )
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(
            f"{path}: not a readable locft reference file ({err}); delete it to recompute"
        ) from None
    except Exception as err:  # safetensors raises its own error types for a malformed header
        raise ValueError(
            f"{path}: not a readable locft reference file ({err}); delete it to recompute"
        ) from None
