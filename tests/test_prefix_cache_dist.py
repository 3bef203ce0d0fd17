"""The prefix cache under FSDP2, 2 gloo ranks: same result as the uncached path, and exact resume."""

import json

import pytest
import torch

from locft_dist.edits import write_jsonl
from tests.test_distributed import EPOCHS, NUM_EDITS, delta, edit_args, kill9, run, start, wait_for_step


@pytest.fixture(scope="module")
def runs(world_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cache_dist")
    edits = tmp / "edits.jsonl"
    write_jsonl(world_model.world.make_edits(NUM_EDITS, seed=3), edits)
    args = [*edit_args(world_model.model_dir, edits), "eval.enabled=false", "train.micro_batch_tokens=48"]
    run(2, tmp / "cached", args)
    run(2, tmp / "plain", [*args, "train.prefix_cache=false"])
    return {"tmp": tmp, "args": args, "cached": delta(tmp / "cached"), "plain": delta(tmp / "plain")}


def _events(run_dir, name):
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == name]


def test_two_rank_cache_equals_the_uncached_path(runs):
    (cache_event,) = _events(runs["tmp"] / "cached", "prefix_cache")
    assert cache_event["first_layer"] == 1 and cache_event["num_edits"] == (NUM_EDITS + 1) // 2  # rank 0's
    assert not _events(runs["tmp"] / "plain", "prefix_cache")
    epoch = _events(runs["tmp"] / "cached", "epoch")[0]
    assert 0 < epoch["num_tokens"] <= epoch["num_padded_tokens"]
    # The two runs split every batch's loss sum differently (edits owned by i % 2 vs contiguous halves, each
    # cut into its own length buckets), so they agree up to float32 rounding that 20 Adam steps amplify
    # (bounded by the tests' Adam epsilon: tests/test_distributed.py ADAM_EPS).
    for name, tensor in runs["plain"].items():
        assert tensor.abs().max() > 1e-3
        torch.testing.assert_close(runs["cached"][name], tensor, atol=1e-5, rtol=0)


def test_resume_with_the_cache_is_bitwise_identical(runs):
    run_dir = runs["tmp"] / "killed"
    proc = start(2, run_dir, runs["args"])
    wait_for_step(run_dir, 8, proc)  # mid-way through the second epoch
    kill9(proc)
    run(2, run_dir, runs["args"])
    assert _events(run_dir, "resume") and len(_events(run_dir, "prefix_cache")) == 2  # rebuilt on resume
    for name, tensor in runs["cached"].items():
        assert torch.equal(delta(run_dir)[name], tensor), name


def test_a_resume_with_one_epoch_left_trains_without_the_cache(runs):
    """Filling would cost a prefix forward per edit and save at most one: the resumed start skips it, and
    its passes run the prefix in other batches, so the delta matches up to rounding, not bitwise."""
    run_dir = runs["tmp"] / "killed_late"
    proc = start(2, run_dir, runs["args"])
    wait_for_step(run_dir, 5 * (EPOCHS - 1) + 1, proc)  # in the last epoch
    kill9(proc)
    proc = run(2, run_dir, runs["args"])
    assert _events(run_dir, "resume") and len(_events(run_dir, "prefix_cache")) == 1  # the first start's
    assert "prefix cache off" in proc.stderr and "edit passes remain" in proc.stderr
    for name, tensor in runs["cached"].items():
        torch.testing.assert_close(delta(run_dir)[name], tensor, atol=1e-5, rtol=0)
