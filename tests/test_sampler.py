import pytest

from locft_dist.sampler import BreadthFirstSampler, epoch_permutation, rank_slice


def run_epochs(sampler, epochs):
    return [[b.indices for b in sampler.epoch_batches()] for _ in range(epochs)]


@pytest.mark.parametrize(("num_edits", "batch"), [(10, 3), (12, 4), (7, 100), (1, 1)])
def test_every_edit_exactly_once_per_epoch(num_edits, batch):
    sampler = BreadthFirstSampler(num_edits, batch, seed=3)
    for epoch_batches in run_epochs(sampler, 3):
        flat = [i for b in epoch_batches for i in b]
        assert sorted(flat) == list(range(num_edits))
        assert all(len(b) == batch for b in epoch_batches[:-1])
        assert len(epoch_batches) == sampler.steps_per_epoch


def test_order_is_seeded_and_reshuffled_each_epoch():
    assert epoch_permutation(50, 0, 0) == epoch_permutation(50, 0, 0)
    assert epoch_permutation(50, 0, 0) != epoch_permutation(50, 0, 1)
    assert epoch_permutation(50, 0, 0) != epoch_permutation(50, 1, 0)


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_rank_slices_partition_each_global_batch(world_size):
    batch = list(range(10))
    slices = [rank_slice(batch, r, world_size) for r in range(world_size)]
    assert [i for s in slices for i in s] == batch
    assert max(map(len, slices)) - min(map(len, slices)) <= 1


def test_resume_mid_epoch_continues_the_same_sequence():
    full = BreadthFirstSampler(23, 5, seed=7, dataset_fingerprint="abc")
    expected = [full.next_batch().indices for _ in range(13)]
    first = BreadthFirstSampler(23, 5, seed=7, dataset_fingerprint="abc")
    got = [first.next_batch().indices for _ in range(6)]
    resumed = BreadthFirstSampler(23, 5, seed=7, dataset_fingerprint="abc")
    resumed.load_state(first.state())
    got += [resumed.next_batch().indices for _ in range(7)]
    assert got == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"dataset_fingerprint": "other"}, "another edit set"), ({"global_batch_size": 4}, "global batch size")],
)
def test_state_from_other_data_or_batch_is_refused(kwargs, message):
    state = BreadthFirstSampler(23, 5, seed=7, dataset_fingerprint="abc").state()
    args = {"num_edits": 23, "global_batch_size": 5, "seed": 7, "dataset_fingerprint": "abc"} | kwargs
    with pytest.raises(ValueError, match=message):
        BreadthFirstSampler(**args).load_state(state)
