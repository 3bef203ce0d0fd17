"""The focus phase (train.focus_epochs): after the breadth-first epochs, only the examples still above
train.focus_loss, measured over every example at each focus epoch's start; equal on two ranks and one, and
resumed exactly."""

import json

import torch

from locft_dist.config import TrainConfig
from locft_dist.focus import above, focus_order, measure_losses
from locft_dist.parallel.single import SingleProcess
from locft_dist.runlog import RunLog
from locft_dist.trainer import TrainProgress, train_breadth_first
from tests.test_distributed import copy_run, delta, edit_args, kill9, run, start, wait_for_step
from tests.test_trainer import examples_for, setup


def test_focus_order_is_a_seeded_permutation():
    indices = [3, 8, 11, 20, 21, 40]
    first = focus_order(indices, seed=0, focus_epoch=0)
    assert sorted(first) == indices
    assert focus_order(indices, seed=0, focus_epoch=0) == first
    assert {tuple(focus_order(indices, seed=0, focus_epoch=e)) for e in range(4)} != {tuple(first)}
    assert above([1, 2, 3], [0.5, 0.01, 0.2], 0.1) == [1, 3]


def _cfg(**kw) -> TrainConfig:
    base = {"epochs": 2, "batch_size": 4, "lr": 1e-2, "early_stop_loss": None, "progress": False}
    return TrainConfig(**(base | kw))


def test_focus_epochs_train_only_what_is_still_above_the_threshold(tiny_tokenizer, tmp_path):
    examples = examples_for(tiny_tokenizer)
    model, _ = setup(tiny_tokenizer)
    strategy = SingleProcess("cpu")
    lengths = [len(e.input_ids) for e in examples]
    train_breadth_first(model, examples, strategy, _cfg(), pad_id=0)
    after_epochs = measure_losses(
        model, examples, range(len(examples)), strategy, 0, batch_size=4, lengths=lengths
    )
    threshold = sorted(after_epochs)[len(examples) // 2]  # about half the examples are above it

    model, _ = setup(tiny_tokenizer)  # the same start: the focus phase begins where that run ended
    progress = TrainProgress()
    log_path = tmp_path / "log.jsonl"
    result = train_breadth_first(
        model,
        examples,
        strategy,
        _cfg(focus_epochs=3, focus_loss=threshold),
        pad_id=0,
        progress=progress,
        run_log=RunLog(log_path),
    )
    events = [json.loads(line) for line in log_path.read_text().splitlines()]
    sets = [e for e in events if e["event"] == "focus_set"]
    assert sets[0]["measured"] == len(examples)
    assert 0 < sets[0]["above"] < len(examples)
    assert all(s["measured"] == len(examples) for s in sets)  # every example, every focus epoch
    focus_steps = [e for e in events if e["event"] == "step" and e.get("focus")]
    assert len(focus_steps) == progress.focus_steps > 0
    assert result.num_steps == 2 * 3 + progress.focus_steps  # 12 examples, batch 4: 3 steps an epoch
    assert all(e["batch_edits"] <= 4 for e in focus_steps)
    assert sum(e["batch_edits"] for e in focus_steps) == sum(
        s["above"] for s in sets[: len(progress.focus_losses)]
    )
    # the first set is exactly the examples above the threshold after the breadth-first epochs
    assert sets[0]["above"] == sum(loss > threshold for loss in after_epochs)


def test_no_example_above_the_threshold_changes_nothing(tiny_tokenizer):
    examples = examples_for(tiny_tokenizer)
    plain, trainable_plain = setup(tiny_tokenizer)
    train_breadth_first(plain, examples, SingleProcess("cpu"), _cfg(), pad_id=0)
    focused, trainable_focused = setup(tiny_tokenizer)
    progress = TrainProgress()
    result = train_breadth_first(
        focused,
        examples,
        SingleProcess("cpu"),
        _cfg(focus_epochs=5, focus_loss=1e9),
        pad_id=0,
        progress=progress,
    )
    assert progress.focus_finished and progress.focus_steps == 0 and result.num_steps == 6
    for (name, a), (_, b) in zip(trainable_plain, trainable_focused, strict=True):
        assert torch.equal(a, b), name


FOCUS = ["train.focus_epochs=3", "train.focus_loss=0.05"]
MAIN_STEPS = 20  # 41 edits, batch 10, 4 epochs (tests/test_distributed.py)


def test_focus_on_two_ranks_equals_one_process_and_resumes_exactly(world_model, tmp_path):
    from locft_dist.edits import write_jsonl

    edits = tmp_path / "edits.jsonl"
    write_jsonl(world_model.world.make_edits(41, seed=2), edits)
    args = [*edit_args(world_model.model_dir, edits), *FOCUS]
    single, double = tmp_path / "single", tmp_path / "double"
    run(1, single, args)
    run(2, double, args)
    events = [json.loads(line) for line in (double / "log.jsonl").read_text().splitlines()]
    focus_steps = [e["step"] for e in events if e["event"] == "step" and e.get("focus")]
    assert len(focus_steps) >= 4, "the focus phase should take several steps"
    record = json.loads((double / "metrics.json").read_text())["train"]
    assert record["num_steps"] == MAIN_STEPS + len(focus_steps)
    assert 1 <= len(record["focus_losses"]) <= 3 and len(record["epoch_losses"]) == 4
    for name, tensor in delta(single).items():
        torch.testing.assert_close(delta(double)[name], tensor, atol=1e-5, rtol=0)

    killed = tmp_path / "killed"
    proc = start(2, killed, args)
    wait_for_step(killed, MAIN_STEPS + 2, proc)  # inside the focus phase
    kill9(proc)
    resumed = copy_run(killed, "resumed")
    run(2, resumed, args)
    log = [json.loads(line) for line in (resumed / "log.jsonl").read_text().splitlines()]
    resume = [e for e in log if e["event"] == "resume"]
    assert resume and resume[-1]["step"] > MAIN_STEPS
    for name, tensor in delta(double).items():
        assert torch.equal(delta(resumed)[name], tensor), name
