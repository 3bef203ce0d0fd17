"""Breadth-first training that resumes exactly: checkpoints every N steps, on preemption, and resume.

Re-running the same command continues from the newest valid checkpoint in ``output.dir``; SIGTERM or
SIGUSR1 makes every rank save together at the next step boundary and exit with ``EXIT_PREEMPTED``.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from locft_dist.checkpoint import EXIT_PREEMPTED, CheckpointManager, PreemptionFlag, TensorStateIO, TrainState
from locft_dist.config import RunConfig
from locft_dist.edits.encode import EncodedExample
from locft_dist.errors import ConfigError
from locft_dist.parallel.base import Strategy
from locft_dist.parallel.memory import log_memory, training_state_bytes
from locft_dist.runlog import RunLog
from locft_dist.sampler import BreadthFirstSampler
from locft_dist.trainer import TrainProgress, TrainResult, train_breadth_first

logger = logging.getLogger(__name__)


class Preempted(Exception):
    """Raised after the preemption checkpoint is saved; the CLI exits with ``EXIT_PREEMPTED``."""

    exit_code = EXIT_PREEMPTED


def clear_checkpoints(run_dir: Path) -> None:
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


def train_resumable(
    cfg: RunConfig,
    strategy: Strategy,
    model: nn.Module,
    examples: Sequence[EncodedExample],
    pad_id: int,
    *,
    dataset_fingerprint: str,
    run_log: RunLog,
) -> TrainResult:
    """Run LocFT-BF, resuming from and writing checkpoints under ``output.dir/checkpoints``."""
    run_dir = Path(cfg.output.dir)
    optimizer = strategy.build_optimizer(model, cfg.train)
    sampler = BreadthFirstSampler(len(examples), cfg.train.batch_size, cfg.train.seed, dataset_fingerprint)
    progress = TrainProgress()
    manager = CheckpointManager(
        run_dir,
        keep_last=cfg.output.keep_last,
        rank=strategy.rank,
        world_size=strategy.world_size,
        barrier=strategy.barrier,
        state_io=strategy if isinstance(strategy, TensorStateIO) else None,
    )
    latest = manager.latest_valid()
    if latest is not None:
        state = manager.load(latest, model, optimizer)
        try:
            sampler.load_state(state.sampler_state())
        except ValueError as err:
            raise ConfigError(f"{latest}: {err}") from None
        progress = TrainProgress(**state.extra["progress"])
        logger.info(
            "resumed from %s (step %d, epoch %d, saved by %d rank(s), now %d)",
            latest,
            state.step,
            sampler.epoch,
            state.world_size,
            strategy.world_size,
        )
        run_log.event("resume", checkpoint=str(latest), step=state.step, consumed=sampler.consumed)
    flag = PreemptionFlag()
    flag.install()
    every = cfg.output.checkpoint_every
    min_seconds = cfg.output.checkpoint_min_minutes * 60
    last_save = time.monotonic()
    final_step = sampler.steps_per_epoch * cfg.train.epochs
    memory_logged = False

    def save(step: int) -> Path:
        state = TrainState(
            step=step,
            sampler=sampler.state().to_dict(),
            epoch_losses=list(progress.epoch_losses),
            world_size=strategy.world_size,
            config=cfg.to_dict(),
            extra={
                "progress": {
                    "epoch_losses": list(progress.epoch_losses),
                    "partial_loss_sum": progress.partial_loss_sum,
                }
            },
        )
        nonlocal last_save
        path = manager.save(step, model, optimizer, state)
        last_save = time.monotonic()
        run_log.event("checkpoint", step=step, path=str(path))
        return path

    def on_step_end(step: int, sampler: BreadthFirstSampler, progress: TrainProgress) -> None:
        nonlocal memory_logged
        if not memory_logged:  # after the first step, when gradients and Adam moments exist
            memory_logged = True
            memory = training_state_bytes(model, optimizer)
            logger.info(
                "rank %d holds %s",
                strategy.rank,
                ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in memory.items()),
            )
            run_log.event("memory", rank=strategy.rank, **memory)
            run_log.event("peak_memory", step=step, **log_memory("after the first step", strategy.device))
        stop = flag.should_stop(strategy.all_reduce_max, device=strategy.device)
        epoch_end = sampler.consumed % sampler.num_edits == 0
        if epoch_end:
            label = f"at the end of epoch {sampler.epoch - 1}"
            run_log.event("peak_memory", step=step, **log_memory(label, strategy.device))
        # Epoch-end saves are spaced by checkpoint_min_minutes and skipped after the last step, where the
        # delta is written next and a rerun finds the run finished. Saving is collective: ranks agree.
        epoch_save = False
        if not every and epoch_end and step < final_step:
            due = torch.tensor([float(time.monotonic() - last_save >= min_seconds)])
            epoch_save = bool(strategy.all_reduce_max(due).item())
        if stop or (every and step % every == 0) or epoch_save:
            path = save(step)
            if stop:
                logger.warning(
                    "preempted (signal %s): saved %s; rerun the same command to resume", flag.received, path
                )
                raise Preempted(str(path))

    try:
        return train_breadth_first(
            model,
            examples,
            strategy,
            cfg.train,
            pad_id,
            sampler=sampler,
            optimizer=optimizer,
            progress=progress,
            run_log=run_log,
            on_step_end=on_step_end,
        )
    finally:
        flag.uninstall()
