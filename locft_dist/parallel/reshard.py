"""Moving a sharded tensor between layouts without any rank holding it whole.

Two layouts meet here. FSDP2 (and DCP checkpoints written from it) shard dim 0 like ``torch.chunk``: rank
``r`` holds rows ``[r * c, (r + 1) * c)``, ``c = ceil(rows / W)``. ZeRO-3 flattens a parameter, pads it to a
multiple of ``W`` and gives rank ``r`` the flat range ``[r * p, (r + 1) * p)``, ``p = ceil(numel / W)``.
Both cover the flattened tensor with increasing ranges, so each rank's piece in one layout meets each
rank's piece in the other in at most one contiguous segment: one ``all_to_all`` moves everything.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _row_ranges(shape: torch.Size, world_size: int) -> list[tuple[int, int]]:
    """Flat [start, stop) of each rank's dim-0 chunk."""
    rows, cols = shape[0], int(torch.Size(shape[1:]).numel())
    chunk = -(-rows // world_size)
    return [(min(r * chunk, rows) * cols, min((r + 1) * chunk, rows) * cols) for r in range(world_size)]


def _flat_ranges(numel: int, partition: int, world_size: int) -> list[tuple[int, int]]:
    """Flat [start, stop) of each rank's ZeRO-3 partition, padding excluded."""
    return [(min(r * partition, numel), min((r + 1) * partition, numel)) for r in range(world_size)]


def _overlaps(mine: tuple[int, int], others: list[tuple[int, int]]) -> list[int]:
    return [max(0, min(mine[1], b) - max(mine[0], a)) for a, b in others]


def flat_to_rows(flat: torch.Tensor, shape: torch.Size, rank: int, world_size: int) -> torch.Tensor:
    """This rank's dim-0 chunk of a tensor of ``shape``, from every rank's flat partition ``flat`` (a
    collective; padding at the end of the last partitions is ignored)."""
    numel = int(torch.Size(shape).numel())
    rows, flats = _row_ranges(shape, world_size), _flat_ranges(numel, flat.numel(), world_size)
    send = _overlaps(flats[rank], rows)
    recv = _overlaps(rows[rank], flats)
    out = flat.new_empty(sum(recv))
    dist.all_to_all_single(out, flat[: sum(send)].contiguous(), recv, send)
    return out.view(-1, *shape[1:])


def rows_to_flat(local_rows: torch.Tensor, shape: torch.Size, partition: int, rank: int, world_size: int):
    """This rank's flat partition (``partition`` elements, zero padding at the end) from every rank's
    dim-0 chunk (a collective; the inverse of ``flat_to_rows``)."""
    numel = int(torch.Size(shape).numel())
    rows, flats = _row_ranges(shape, world_size), _flat_ranges(numel, partition, world_size)
    send = _overlaps(rows[rank], flats)
    recv = _overlaps(flats[rank], rows)
    out = local_rows.new_zeros(partition)
    dist.all_to_all_single(out[: sum(recv)], local_rows.reshape(-1).contiguous(), recv, send)
    return out


def gather_rows(local: torch.Tensor, num_rows: int, rank: int, world_size: int) -> torch.Tensor | None:
    """The dim-0 chunks of a tensor joined on rank 0; None on the others. A gather, not an all-gather:
    only rank 0 ever holds the whole tensor."""
    chunk = -(-num_rows // world_size)
    padded = local.new_zeros((chunk, *local.shape[1:]))
    padded[: local.shape[0]].copy_(local)
    parts = [torch.empty_like(padded) for _ in range(world_size)] if rank == 0 else None
    dist.gather(padded, parts, dst=0)
    if parts is None:
        return None
    return torch.cat(parts)[:num_rows]


def local_rows(full: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's dim-0 chunk of a whole tensor (a copy, so the whole one can be freed)."""
    chunk = -(-full.shape[0] // world_size)
    return full[rank * chunk : (rank + 1) * chunk].clone()
