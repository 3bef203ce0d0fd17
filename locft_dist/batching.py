"""Length-aware micro-batching of one rank's share of a global batch.

The loss of a global batch is a sum of per-edit shares, so how a rank splits its share into micro-batches
does not change the gradient. Sorting the share by length before cutting it into micro-batches puts edits
of similar length together, so each micro-batch pads only to its own longest edit (never to a global max).

Where to cut is a trade: every pass has a fixed cost (kernel launches, the frozen layers' weights read
once more, collectives under FSDP), every padded token a variable one. With ``pass_cost`` (that fixed
cost in padded-token equivalents) the cuts minimize ``passes * pass_cost + padded tokens`` exactly, by
dynamic programming over the sorted share: a handful of buckets on CPU, where a pass costs little, and
one or two large micro-batches on a GPU, where small ones leave it idle.
"""

from __future__ import annotations

from collections.abc import Sequence

from locft_dist.sampler import rank_slice

PASS_COST_TOKENS = {"cpu": 64, "cuda": 4096}
"""Default fixed cost of one forward/backward pass, in padded tokens, by device type."""


def default_pass_cost(device_type: str) -> int:
    return PASS_COST_TOKENS.get(device_type, PASS_COST_TOKENS["cuda"])


def length_sorted_chunks(
    indices: Sequence[int],
    lengths: Sequence[int],
    micro: int | None,
    max_tokens: int | None = None,
    pass_cost: int | None = None,
) -> list[list[int]]:
    """``indices`` cut into micro-batches of at most ``micro`` edits and ``max_tokens`` padded tokens
    (edits x longest; a single longer edit still gets its own micro-batch).

    Without ``pass_cost``, the share stays one micro-batch in batch order when it fits, and is otherwise
    filled greedily in (length, index) order. With it, the cuts of the sorted share minimize
    ``passes * pass_cost + padded tokens`` under the same limits.
    """
    if not indices:
        return []
    order = sorted(indices, key=lambda i: (lengths[i], i))
    if pass_cost is not None:
        chunks = _cheapest_cuts(order, lengths, micro, max_tokens, pass_cost)
        return [list(indices)] if len(chunks) == 1 else chunks  # one pass: keep the batch's summation order
    padded = len(indices) * max(lengths[i] for i in indices)
    if (micro is None or len(indices) <= micro) and (max_tokens is None or padded <= max_tokens):
        return [list(indices)]  # one micro-batch: keep the batch order (sorting would only reorder the sum)
    chunks: list[list[int]] = []
    for index in order:
        if chunks:
            chunk = chunks[-1]
            fits = micro is None or len(chunk) < micro
            fits = fits and (max_tokens is None or (len(chunk) + 1) * lengths[index] <= max_tokens)
            if fits:
                chunk.append(index)
                continue
        chunks.append([index])
    return chunks


def _cheapest_cuts(
    order: list[int], lengths: Sequence[int], micro: int | None, max_tokens: int | None, pass_cost: int
) -> list[list[int]]:
    """Contiguous cuts of length-sorted ``order`` with the least ``passes * pass_cost + padded tokens``."""
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cheapest cost of order[:j]
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]]  # sorted: the last edit of a chunk is its longest
        for i in range(j - 1, -1, -1):
            size = j - i
            too_many = micro is not None and size > micro
            too_long = max_tokens is not None and size * longest > max_tokens
            if size > 1 and (too_many or too_long):
                break  # a longer chunk ending at j only breaks the limits further
            cost = best[i] + pass_cost + size * longest
            if cost < best[j]:
                best[j], cut[j] = cost, i
    chunks: list[list[int]] = []
    j = n
    while j > 0:
        chunks.append(order[cut[j] : j])
        j = cut[j]
    return chunks[::-1]


def rank_chunks(
    batch: Sequence[int],
    rank: int,
    world_size: int,
    micro: int | None,
    lengths: Sequence[int],
    *,
    modulo_owner: bool = False,
    max_tokens: int | None = None,
    pass_cost: int | None = None,
) -> list[tuple[list[int], float]]:
    """This rank's micro-batches of a global batch as (indices, weight).

    The share is the contiguous ``rank_slice`` of the batch, or with ``modulo_owner`` the edits ``i`` with
    ``i % world_size == rank`` (fixed ownership, for per-rank caches). Sharded models need every rank to run
    the same number of passes (each one holds collectives), so a rank with fewer micro-batches pads with
    zero-weight passes over one of its own edits (when it has none: edit ``rank``, which it owns, or the
    batch's first). ``micro=None``, ``max_tokens=None`` and ``pass_cost=None``: one pass per share.
    """
    if modulo_owner:
        shares = [[i for i in batch if i % world_size == r] for r in range(world_size)]
    else:
        shares = [rank_slice(list(batch), r, world_size) for r in range(world_size)]
    per_rank = [length_sorted_chunks(share, lengths, micro, max_tokens, pass_cost) for share in shares]
    local = shares[rank]
    chunks: list[tuple[list[int], float]] = [(c, 1.0) for c in per_rank[rank]]
    pad = [local[0]] if local else [rank if modulo_owner else batch[0]]
    while len(chunks) < max(len(c) for c in per_rank):
        chunks.append((pad, 0.0))
    return chunks
