"""Length-aware micro-batching of one rank's share of a global batch.

The loss of a global batch is a sum of per-edit shares, so how a rank splits its share into micro-batches
does not change the gradient. Sorting the share by length before cutting it into micro-batches puts edits
of similar length together, so each micro-batch pads only to its own longest edit (never to a global max).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from locft_dist.sampler import rank_slice


def length_sorted_chunks(indices: Sequence[int], lengths: Sequence[int], micro: int) -> list[list[int]]:
    """``indices`` sorted by (length, index) and cut into micro-batches of at most ``micro`` edits."""
    ordered = sorted(indices, key=lambda i: (lengths[i], i))
    return [ordered[i : i + micro] for i in range(0, len(ordered), micro)]


def rank_chunks(
    batch: Sequence[int],
    rank: int,
    world_size: int,
    micro: int | None,
    lengths: Sequence[int],
    *,
    modulo_owner: bool = False,
) -> list[tuple[list[int], float]]:
    """This rank's micro-batches of a global batch as (indices, weight).

    The share is the contiguous ``rank_slice`` of the batch, or with ``modulo_owner`` the edits ``i`` with
    ``i % world_size == rank`` (fixed ownership, for per-rank caches). Sharded models need every rank to run
    the same number of passes (each one holds collectives), so a shorter share pads with zero-weight passes
    over one of its own edits (when it has none: edit ``rank``, which it owns, or the batch's first).
    ``micro=None``: one pass for the largest share.
    """
    if modulo_owner:
        shares = [[i for i in batch if i % world_size == r] for r in range(world_size)]
    else:
        shares = [rank_slice(list(batch), r, world_size) for r in range(world_size)]
    largest = max(len(s) for s in shares)
    micro = micro or largest
    local = shares[rank]
    chunks: list[tuple[list[int], float]] = [(c, 1.0) for c in length_sorted_chunks(local, lengths, micro)]
    pad = [local[0]] if local else [rank if modulo_owner else batch[0]]
    while len(chunks) < math.ceil(largest / micro):
        chunks.append((pad, 0.0))
    return chunks
