"""Checkpoints: exact resume, no frozen weights saved, verification, keep-last, resharding 2 <-> 1 ranks."""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal

import pytest
import torch
import torch.multiprocessing as mp
from conftest import make_random_llama
from dist_workers import checkpoint_worker as worker
from safetensors import safe_open

from locft_dist import checkpoint
from locft_dist.checkpoint import CheckpointManager, TrainState, read_tensors_metadata, tensor_files
from locft_dist.run.signals import RunSignals, Stopped
from locft_dist.sampler import BreadthFirstSampler


def _manager(run_dir, keep_last: int = 2) -> CheckpointManager:
    return CheckpointManager(run_dir, keep_last=keep_last, rank=0, world_size=1, barrier=lambda: None)


def _llama():
    """Tiny random Llama with only layer 1's down_proj and o_proj trainable (a localized edit)."""
    model = make_random_llama(50, seed=0, num_layers=2, hidden=32).train()
    for name, param in model.named_parameters():
        param.requires_grad_(
            name.startswith(("model.layers.1.mlp.down_proj", "model.layers.1.self_attn.o_proj"))
        )
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1
    )
    return model, optimizer


def _train_llama(model, optimizer, steps: range) -> None:
    for step in steps:
        ids = torch.randint(3, 50, (2, 7), generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()


def test_resume_is_bitwise_exact_and_saves_only_trainable(tmp_path):
    model, optimizer = _llama()
    sampler = BreadthFirstSampler(10, 2, seed=3, dataset_fingerprint="fp", consumed=4)
    _train_llama(model, optimizer, range(2))
    state = TrainState(step=2, sampler=sampler.state().to_dict(), epoch_losses=[2.5], config={"lr": 0.01})
    path = _manager(tmp_path).save(2, model, optimizer, state)
    saved_weight = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    _train_llama(model, optimizer, range(2, 5))

    fresh, fresh_optimizer = _llama()
    mgr = _manager(tmp_path)
    assert mgr.latest_valid() == path == tmp_path / "checkpoints" / "step-2"
    loaded = mgr.load(path, fresh, fresh_optimizer)
    assert loaded.step == 2 and loaded.epoch_losses == [2.5] and loaded.config == {"lr": 0.01}
    assert loaded.sampler_state() == sampler.state()
    assert fresh_optimizer.param_groups[0]["betas"] == (0.9, 0.999)
    _train_llama(fresh, fresh_optimizer, range(2, 5))

    expected, actual = worker.full_state(model, optimizer), worker.full_state(fresh, fresh_optimizer)
    assert any(k.endswith(".step") for k in actual)
    worker.assert_equal(actual, expected)
    for (name, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.equal(a, b), name

    keys = set(read_tensors_metadata(path))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {k.removeprefix("model.") for k in keys if k.startswith("model.")} == trainable
    assert all(k.startswith(("model.", "optim.state.")) for k in keys), "only tensors go through DCP"
    # plain safetensors files with JSON headers: no pickled DCP .metadata to read
    assert not (path / ".metadata").exists()
    (file,) = tensor_files(path)
    with safe_open(str(file), framework="pt") as handle:
        assert set(handle.keys()) == keys
        assert torch.equal(handle.get_tensor("model.model.layers.1.mlp.down_proj.weight"), saved_weight)
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size < 4 * sum(p.numel() * 4 for p in model.parameters() if p.requires_grad) + 64_000


def test_rng_is_restored(tmp_path):
    model = worker.make_model()
    optimizer = worker.make_optimizer(model)
    worker.train(model, optimizer, range(1))
    torch.manual_seed(11)
    random.seed(5)
    path = _manager(tmp_path).save(1, model, optimizer, worker.train_state(1, 1))
    draws = (torch.rand(4), random.random())
    torch.manual_seed(99)
    random.seed(99)
    fresh = worker.make_model()
    _manager(tmp_path).load(path, fresh, worker.make_optimizer(fresh))
    after = (torch.rand(4), random.random())
    assert torch.equal(after[0], draws[0]) and after[1] == draws[1]


def test_optimizer_that_never_stepped_stays_empty(tmp_path):
    """DCP's get_optimizer_state_dict would take a zero-lr step (Adam step=1): saving must not."""
    model = worker.make_model()
    optimizer = worker.make_optimizer(model)
    path = _manager(tmp_path).save(0, model, optimizer, worker.train_state(0, 1))
    assert not optimizer.state
    fresh = worker.make_model()
    fresh_optimizer = worker.make_optimizer(fresh)
    _manager(tmp_path).load(path, fresh, fresh_optimizer)
    assert not fresh_optimizer.state
    worker.train(model, optimizer, range(2))
    worker.train(fresh, fresh_optimizer, range(2))
    worker.assert_equal(worker.full_state(fresh, fresh_optimizer), worker.full_state(model, optimizer))


def test_optimizer_hyperparameters_come_from_the_checkpoint(tmp_path, caplog):
    """Param groups travel in JSON (DCP would unpickle them); types are kept (betas stays a tuple)."""
    path = _save_steps(tmp_path, [1], keep_last=1).step_dirs()[0][1]
    fresh = worker.make_model()
    optimizer = torch.optim.AdamW(
        [p for p in fresh.parameters() if p.requires_grad], lr=1.0, betas=(0.5, 0.5)
    )
    with caplog.at_level(logging.WARNING, logger="locft_dist.checkpoint"):
        _manager(tmp_path).load(path, fresh, optimizer)
    group = optimizer.param_groups[0]
    assert group["betas"] == (0.8, 0.95) and group["weight_decay"] == 0.1 and group["lr"] == 1e-2
    assert any("betas" in r.getMessage() for r in caplog.records)


def _save_steps(run_dir, steps, keep_last: int):
    model = worker.make_model()
    optimizer = worker.make_optimizer(model)
    mgr = _manager(run_dir, keep_last)
    for step in steps:
        worker.train(model, optimizer, range(step - 1, step))
        mgr.save(step, model, optimizer, worker.train_state(step, 1))
    return mgr


def test_keep_last(tmp_path):
    mgr = _save_steps(tmp_path, range(1, 5), keep_last=2)
    assert [step for step, _ in mgr.step_dirs()] == [4, 3]


def test_kept_checkpoints_are_not_hashed_again_on_every_save(tmp_path, monkeypatch):
    """Each checkpoint's files are hashed once, when written: later saves do not re-read the kept ones."""
    hashed: list[str] = []
    real = checkpoint._sha256
    monkeypatch.setattr(checkpoint, "_sha256", lambda path: hashed.append(path.parent.name) or real(path))
    _save_steps(tmp_path, range(1, 6), keep_last=3)
    per_step = {name: hashed.count(name) for name in set(hashed)}
    assert set(per_step) == {f".step-{step}.tmp" for step in range(1, 6)}, per_step  # only at writing
    assert len(set(per_step.values())) == 1, per_step  # the same number of files each, hashed once


def _damage(path, how: str) -> None:
    data = next(path.glob("*.safetensors"))
    if how == "bitflip":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        data.write_bytes(bytes(raw))
    elif how == "truncate":
        data.write_bytes(data.read_bytes()[:-10])
    elif how == "no_manifest":
        (path / "manifest.json").unlink()
    else:
        (path / "train_state.json").unlink()


@pytest.mark.parametrize("how", ["bitflip", "truncate", "no_manifest", "missing_file"])
def test_damaged_latest_is_skipped_with_a_warning(tmp_path, caplog, how):
    mgr = _save_steps(tmp_path, range(1, 3), keep_last=3)
    _damage(tmp_path / "checkpoints" / "step-2", how)
    with caplog.at_level(logging.WARNING, logger="locft_dist.checkpoint"):
        assert mgr.latest_valid() == tmp_path / "checkpoints" / "step-1"
    assert any("step-2" in r.getMessage() and "skipping" in r.getMessage() for r in caplog.records)


def test_leftover_tmp_dir_is_ignored_and_cleaned_up(tmp_path):
    mgr = _save_steps(tmp_path, range(1, 3), keep_last=3)
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(checkpoints / "step-2", checkpoints / ".step-9.tmp")  # even a complete-looking one
    assert mgr.latest_valid() == checkpoints / "step-2"
    _save_steps(tmp_path, [3], keep_last=3)
    assert not (checkpoints / ".step-9.tmp").exists()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-1", "step-2", "step-3"]


def test_checkpoint_of_other_parameters_is_refused(tmp_path):
    path = _save_steps(tmp_path, [1], keep_last=1).step_dirs()[0][1]
    other = worker.make_model()
    other[2].bias.requires_grad_(True)
    with pytest.raises(ValueError, match="other trainable tensors"):
        _manager(tmp_path).load(path, other, worker.make_optimizer(other))


def test_signals_set_a_flag_while_training_and_stop_at_once_elsewhere():
    previous = {sig: signal.getsignal(sig) for sig in RunSignals.SIGNALS}
    signals = RunSignals(is_main=False)
    with signals:
        with signals.deferred("training"):
            assert not signals.should_stop(lambda t: t)
            os.kill(os.getpid(), signal.SIGUSR1)
            assert signals.should_stop(lambda t: t) and signals.received == signal.SIGUSR1
            os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C of the run: still only the flag
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)  # the second one stops at once
        signals.phase = "evaluating the edited model"
        with pytest.raises(Stopped, match="SIGTERM while evaluating the edited model"):
            os.kill(os.getpid(), signal.SIGTERM)
    assert {sig: signal.getsignal(sig) for sig in RunSignals.SIGNALS} == previous


def _spawn(mode: str, run_dir, out) -> None:
    mp.spawn(worker.run, args=(mode, str(run_dir), str(out)), nprocs=2, join=True)


def test_two_ranks_fsdp_save_and_reshard_both_ways(tmp_path, monkeypatch):
    """2 FSDP2 ranks save -> 1 process loads (2 -> 1) and saves -> 2 ranks load both (1 -> 2, bitwise)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run2 = tmp_path / "run2"
    _spawn("save", run2, tmp_path)
    path = run2 / "checkpoints" / f"step-{worker.SAVE_STEP}"
    keys = set(read_tensors_metadata(path))
    assert not any(k.startswith(("model.0.", "model.2.bias")) for k in keys), "frozen params were saved"
    assert len(tensor_files(path)) == 2

    model = worker.make_model()
    optimizer = worker.make_optimizer(model)
    state = _manager(run2).load(path, model, optimizer)
    assert state.world_size == 2 and state.step == worker.SAVE_STEP
    worker.assert_equal(
        worker.full_state(model, optimizer), torch.load(tmp_path / "saved2.pt", weights_only=True)
    )
    worker.train(model, optimizer, range(worker.SAVE_STEP, worker.SAVE_STEP + 1))
    _manager(tmp_path / "run1").save(worker.SAVE_STEP + 1, model, optimizer, worker.train_state(4, 1))
    torch.save(worker.full_state(model, optimizer), tmp_path / "saved1.pt")

    _spawn("resume", run2, tmp_path)


@pytest.mark.parametrize(("min_minutes", "expected"), [(10.0, [9]), (0.0, [3, 6, 9])])
def test_epoch_end_checkpoints_are_spaced_and_the_last_step_is_kept(
    tmp_path, tiny_tokenizer, min_minutes, expected
):
    """The default policy: an epoch-end save only when the last one is old enough; the last step is
    always saved (the trained weights, so a rerun that only has to export or evaluate does not retrain)."""
    from locft_dist.config import load_config
    from locft_dist.parallel.single import SingleProcess
    from locft_dist.run.resume import train_resumable
    from locft_dist.runlog import RunLog
    from tests.test_trainer import examples_for, setup

    cfg = load_config(
        None,
        [
            "train.epochs=3",
            "train.batch_size=4",
            "train.progress=false",
            "train.early_stop_loss=null",
            f"output.checkpoint_min_minutes={min_minutes}",
            f"output.dir={tmp_path}",
        ],
    )
    model, _ = setup(tiny_tokenizer)
    examples = examples_for(tiny_tokenizer)  # 12 edits: 3 steps an epoch
    with RunSignals() as signals:
        result = train_resumable(
            cfg,
            SingleProcess("cpu"),
            model,
            examples,
            0,
            dataset_fingerprint="f",
            run_log=RunLog(None),
            signals=signals,
        )
    assert result.num_steps == 9
    steps = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "checkpoints").glob("step-*"))
    assert steps == expected[-cfg.output.keep_last :]
