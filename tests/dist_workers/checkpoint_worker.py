"""Worker for tests/test_checkpoint.py: 2 gloo ranks, FSDP2-sharded tiny model, save and resume.

Importable by processes started with ``torch.multiprocessing.spawn`` (spawn passes ``sys.path`` on).
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from locft_dist.checkpoint import CheckpointManager, TrainState

SAVE_STEP = 3
NUM_STEPS = 6


def make_model() -> nn.Sequential:
    """Deterministic tiny MLP; layer 0 and one bias frozen; odd sizes so shards are uneven."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3))
    model[0].requires_grad_(False)
    model[2].bias.requires_grad_(False)
    return model


def shard(model: nn.Sequential) -> nn.Sequential:
    """Freeze before sharding (done in make_model), then FSDP2 per Linear and at the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in (model[0], model[2], model[4]):
        fully_shard(layer)
    fully_shard(model)
    return model


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    """The same global batch on every rank, so the averaged FSDP gradient equals the single-process one."""
    for step in steps:
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad(set_to_none=True)
        model(x).pow(2).mean().backward()
        optimizer.step()


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Unsharded trainable params and Adam state keyed by name (collective for DTensors)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {f"param.{n}": _full(p) for n, p in model.named_parameters() if p.requires_grad}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            out[f"optim.{names[id(param)]}.{key}"] = _full(value)
    return out


def assert_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys(), (sorted(actual), sorted(expected))
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def manager(run_dir: Path, rank: int, world_size: int) -> CheckpointManager:
    barrier = dist.barrier if world_size > 1 else (lambda: None)
    return CheckpointManager(run_dir, keep_last=2, rank=rank, world_size=world_size, barrier=barrier)


def train_state(step: int, world_size: int) -> TrainState:
    sampler = {
        "consumed": 4 * step,
        "seed": 0,
        "global_batch_size": 4,
        "num_edits": 40,
        "dataset_fingerprint": "x",
    }
    return TrainState(step=step, sampler=sampler, epoch_losses=[1.5], world_size=world_size)


def _save(rank: int, run_dir: Path, out: Path) -> None:
    """Train sharded, save at SAVE_STEP, keep training: references for the single-process checks."""
    model = shard(make_model())
    assert all(type(p).__name__ == "DTensor" for p in model.parameters()), "not sharded"
    optimizer = make_optimizer(model)
    train(model, optimizer, range(SAVE_STEP))
    manager(run_dir, rank, 2).save(SAVE_STEP, model, optimizer, train_state(SAVE_STEP, 2))
    saved = full_state(model, optimizer)
    train(model, optimizer, range(SAVE_STEP, NUM_STEPS))
    continued = full_state(model, optimizer)
    if rank == 0:
        torch.save(saved, out / "saved2.pt")
        torch.save(continued, out / "continued2.pt")


def _resume(rank: int, run_dir: Path, out: Path) -> None:
    """Resume the 2-rank checkpoint on 2 ranks (bitwise) and the 1-process one on 2 ranks (1 -> 2)."""
    model = shard(make_model())
    optimizer = make_optimizer(model)
    mgr = manager(run_dir, rank, 2)
    path = mgr.latest_valid()
    assert path is not None and path.name == f"step-{SAVE_STEP}", path
    state = mgr.load(path, model, optimizer)
    assert state.step == SAVE_STEP and state.world_size == 2
    train(model, optimizer, range(SAVE_STEP, NUM_STEPS))
    assert_equal(full_state(model, optimizer), torch.load(out / "continued2.pt", weights_only=True))

    model = shard(make_model())
    optimizer = make_optimizer(model)
    mgr = manager(out / "run1", rank, 2)
    state = mgr.load(mgr.latest_valid(), model, optimizer)
    assert state.world_size == 1
    assert_equal(full_state(model, optimizer), torch.load(out / "saved1.pt", weights_only=True))


def run(rank: int, mode: str, run_dir: str, out: str) -> None:
    """Entry point for ``torch.multiprocessing.spawn(run, args=(mode, run_dir, out), nprocs=2)``.

    A file store rather than tcp://: no port to race for, and no store server on rank 0 that the other
    rank's store threads can outlive at exit (which aborted a process now and then).
    """
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    store = Path(out) / f"store-{mode}"
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timedelta(seconds=120)
    )
    try:
        {"save": _save, "resume": _resume}[mode](rank, Path(run_dir), Path(out))
        dist.barrier()
    finally:
        dist.destroy_process_group()
