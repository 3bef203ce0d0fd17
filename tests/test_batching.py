"""Length buckets: the cheapest cuts under the limits, each edit once, fitted to the device's pass cost."""

import itertools
import random

from locft_dist.batching import default_pass_cost, length_sorted_chunks, rank_chunks


def cost(chunks, lengths, pass_cost):
    return sum(pass_cost + len(c) * max(lengths[i] for i in c) for c in chunks)


def brute_force_cost(order, lengths, micro, max_tokens, pass_cost):
    """Cheapest contiguous partition of the sorted order, by trying every set of cut points."""
    n, best = len(order), float("inf")
    for mask in range(1 << (n - 1)):
        cuts = [0] + [i + 1 for i in range(n - 1) if mask >> i & 1] + [n]
        chunks = [order[a:b] for a, b in itertools.pairwise(cuts)]
        if all(
            len(c) == 1
            or (
                (micro is None or len(c) <= micro)
                and (max_tokens is None or len(c) * lengths[c[-1]] <= max_tokens)
            )
            for c in chunks
        ):
            best = min(best, cost(chunks, lengths, pass_cost))
    return best


def test_cuts_are_the_cheapest_and_cover_the_share_once():
    rng = random.Random(0)
    for _ in range(60):
        n = rng.randint(1, 9)
        lengths = [rng.randint(3, 60) for _ in range(20)]
        share = rng.sample(range(20), n)
        micro = rng.choice([None, 2, 3, 5])
        max_tokens = rng.choice([None, 60, 150])
        pass_cost = rng.choice([0, 8, 64, 500])
        chunks = length_sorted_chunks(share, lengths, micro, max_tokens, pass_cost)
        assert sorted(i for c in chunks for i in c) == sorted(share)
        for c in chunks:
            assert len(c) == 1 or micro is None or len(c) <= micro
            assert len(c) == 1 or max_tokens is None or len(c) * max(lengths[i] for i in c) <= max_tokens
        order = sorted(share, key=lambda i: (lengths[i], i))
        assert cost(chunks, lengths, pass_cost) == brute_force_cost(
            order, lengths, micro, max_tokens, pass_cost
        )


def test_cheap_passes_make_buckets_and_expensive_ones_keep_one_batch():
    lengths = [10] * 5 + [40] * 5
    share = [9, 0, 8, 1, 7, 2, 6, 3, 5, 4]
    cpu = length_sorted_chunks(share, lengths, None, None, default_pass_cost("cpu"))
    assert cpu == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]  # 2 x 64 + 50 + 200 < 64 + 400
    gpu = length_sorted_chunks(share, lengths, None, None, default_pass_cost("cuda"))
    assert gpu == [share]  # one pass in the batch's own order: the summation order is unchanged


def test_every_rank_runs_the_same_number_of_passes():
    lengths = [5, 50, 6, 51, 7, 52, 8, 9]
    batch = list(range(8))
    counts = {len(rank_chunks(batch, r, 3, None, lengths, pass_cost=16)) for r in range(3)}
    assert len(counts) == 1
