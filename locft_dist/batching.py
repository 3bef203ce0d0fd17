"""Length-aware micro-batching of one rank's share of a global batch.

The loss of a global batch is a sum of per-edit shares, so how a rank splits its share into micro-batches
does not change the gradient. Sorting the share by length before cutting it into micro-batches puts edits
of similar length together, so each micro-batch pads only to its own longest edit (never to a global max).
"""

from __future__ import annotations

from collections.abc import Sequence

from locft_dist.sampler import rank_slice


def length_sorted_chunks(
    indices: Sequence[int], lengths: Sequence[int], micro: int | None, max_tokens: int | None = None
) -> list[list[int]]:
    """``indices`` sorted by (length, index), cut into micro-batches of at most ``micro`` edits and at most
    ``max_tokens`` padded tokens (edits x longest; a single longer edit still gets its own micro-batch)."""
    if not indices:
        return []
    padded = len(indices) * max(lengths[i] for i in indices)
    if (micro is None or len(indices) <= micro) and (max_tokens is None or padded <= max_tokens):
        return [list(indices)]  # one micro-batch: keep the batch order (sorting would only reorder the sum)
    chunks: list[list[int]] = []
    for index in sorted(indices, key=lambda i: (lengths[i], i)):
        if chunks:
            chunk = chunks[-1]
            fits = micro is None or len(chunk) < micro
            fits = fits and (max_tokens is None or (len(chunk) + 1) * lengths[index] <= max_tokens)
            if fits:
                chunk.append(index)
                continue
        chunks.append([index])
    return chunks


def rank_chunks(
    batch: Sequence[int],
    rank: int,
    world_size: int,
    micro: int | None,
    lengths: Sequence[int],
    *,
    modulo_owner: bool = False,
    max_tokens: int | None = None,
) -> list[tuple[list[int], float]]:
    """This rank's micro-batches of a global batch as (indices, weight).

    The share is the contiguous ``rank_slice`` of the batch, or with ``modulo_owner`` the edits ``i`` with
    ``i % world_size == rank`` (fixed ownership, for per-rank caches). Sharded models need every rank to run
    the same number of passes (each one holds collectives), so a rank with fewer micro-batches pads with
    zero-weight passes over one of its own edits (when it has none: edit ``rank``, which it owns, or the
    batch's first). ``micro=None`` and ``max_tokens=None``: one pass per share.
    """
    if modulo_owner:
        shares = [[i for i in batch if i % world_size == r] for r in range(world_size)]
    else:
        shares = [rank_slice(list(batch), r, world_size) for r in range(world_size)]
    per_rank = [length_sorted_chunks(share, lengths, micro, max_tokens) for share in shares]
    local = shares[rank]
    chunks: list[tuple[list[int], float]] = [(c, 1.0) for c in per_rank[rank]]
    pad = [local[0]] if local else [rank if modulo_owner else batch[0]]
    while len(chunks) < max(len(c) for c in per_rank):
        chunks.append((pad, 0.0))
    return chunks
