"""Breadth-first training that resumes exactly: checkpoints every N steps, on a signal and at the end.

Re-running the same command continues from the newest valid checkpoint in ``output.dir``; SIGTERM, SIGUSR1
or Ctrl-C make every rank save together at the next step boundary and stop with ``EXIT_PREEMPTED``. The
last step is always checkpointed, so a rerun after training (killed while writing the delta or evaluating)
loads the trained weights instead of training again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from locft_dist.checkpoint import CheckpointManager, TensorStateIO, TrainState
from locft_dist.config import RunConfig
from locft_dist.edits.encode import EncodedExample
from locft_dist.errors import ConfigError
from locft_dist.parallel.base import Strategy
from locft_dist.parallel.memory import log_memory, training_state_bytes
from locft_dist.run.signals import RESUME_HINT, RunSignals, Stopped
from locft_dist.runlog import RunLog
from locft_dist.sampler import BreadthFirstSampler, Replay
from locft_dist.trainer import TrainProgress, TrainResult, train_breadth_first

logger = logging.getLogger(__name__)


def checkpoint_manager(cfg: RunConfig, strategy: Strategy) -> CheckpointManager:
    return CheckpointManager(
        Path(cfg.output.dir),
        keep_last=cfg.output.keep_last,
        rank=strategy.rank,
        world_size=strategy.world_size,
        barrier=strategy.barrier,
        state_io=strategy if isinstance(strategy, TensorStateIO) else None,
    )


def train_resumable(
    cfg: RunConfig,
    strategy: Strategy,
    model: nn.Module,
    examples: Sequence[EncodedExample],
    pad_id: int,
    *,
    dataset_fingerprint: str,
    run_log: RunLog,
    signals: RunSignals,
    replay: Replay | None = None,
) -> TrainResult:
    """Run LocFT-BF, resuming from and writing checkpoints under ``output.dir/checkpoints``.

    ``replay``: a continual run's earlier edits, laid out after the new ``examples`` (``sampler.Replay``).

    The result covers every attempt of the run: steps, seconds and edits/s include those before a resume.
    """
    optimizer = strategy.build_optimizer(model, cfg.train)
    sampler = BreadthFirstSampler(
        len(examples), cfg.train.batch_size, cfg.train.seed, dataset_fingerprint, replay=replay
    )
    progress = TrainProgress()
    manager = checkpoint_manager(cfg, strategy)
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
        run_log.event(
            "resume",
            checkpoint=str(latest),
            step=state.step,
            consumed=sampler.consumed,
            world_size=strategy.world_size,
            saved_world_size=state.world_size,
        )
    every = cfg.output.checkpoint_every
    min_seconds = cfg.output.checkpoint_min_minutes * 60
    last_save = time.monotonic()
    final_step = sampler.steps_per_epoch * cfg.train.epochs
    memory_logged = False
    last_saved = state.step if latest is not None else None

    def save(step: int, at: BreadthFirstSampler) -> Path:
        """Checkpoint ``step``; ``at`` is the sampler as it stood after that step (the trainer's hook may
        run after the next batch was drawn)."""
        nonlocal last_saved, last_save
        state = TrainState(
            step=step,
            sampler=at.state().to_dict(),
            epoch_losses=list(progress.epoch_losses),
            world_size=strategy.world_size,
            config=cfg.to_dict(),
            extra={"progress": progress.to_dict()},
        )
        path = manager.save(step, model, optimizer, state)
        last_saved = step
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
        # one process agrees with itself: no device tensor, so no wait on the GPU for it
        stop = signals.should_stop(
            strategy.all_reduce_max, device=strategy.device if strategy.world_size > 1 else "cpu"
        )
        if progress.in_focus:
            epoch_end = progress.focus_epoch_ended
            label = f"at the end of focus epoch {progress.focus_epochs_done - 1}"
        else:
            epoch_end = sampler.consumed % sampler.num_edits == 0
            label = f"at the end of epoch {sampler.epoch - 1}"
        if epoch_end:
            run_log.event("peak_memory", step=step, **log_memory(label, strategy.device))
        # Epoch-end saves are spaced by checkpoint_min_minutes and skipped after the last step, where the
        # delta is written next and a rerun finds the run finished. Saving is collective: ranks agree.
        epoch_save = False
        if not every and epoch_end and (step < final_step or progress.focus_pending(cfg.train)):
            due = torch.tensor([float(time.monotonic() - last_save >= min_seconds)])
            epoch_save = bool(strategy.all_reduce_max(due).item())
        if stop or (every and step % every == 0) or epoch_save:
            path = save(step, sampler)
            if stop:
                run_log.event("stopped", step=step, checkpoint=str(path))
                logger.warning("stopped: saved %s; %s", path, RESUME_HINT)
                raise Stopped(f"checkpoint {path} saved; {RESUME_HINT}")

    with signals.deferred("training"):
        result = train_breadth_first(
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
        if last_saved != result.num_steps:  # the trained weights, for a rerun that only has to export
            save(result.num_steps, sampler)
    result.seconds = progress.seconds
    result.num_edit_passes = progress.num_edit_passes
    return result
