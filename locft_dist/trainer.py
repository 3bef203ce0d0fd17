"""The editing loops, written out plainly: breadth-first (LocFT-BF) and the depth-first baseline.

Breadth-first: several epochs over the whole edit set, reshuffled each epoch by (seed, epoch), one
optimizer step per global mini-batch. The loss of a global batch is the mean over its edits of each edit's
mean target-token cross-entropy; every rank adds its edits' share, so gradients are the same whatever the
world size or micro-batch size.

Depth-first (FT-M habit): each edit is optimized alone, with a fresh optimizer, until its loss is below a
threshold or a step budget runs out, then the next edit; earlier edits are never revisited.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from locft_dist.batching import default_pass_cost, rank_chunks
from locft_dist.compile import compiled_layers
from locft_dist.config import TrainConfig
from locft_dist.edits.encode import EncodedExample, collate, to_device
from locft_dist.focus import above, focus_order, measure_losses
from locft_dist.fused_norm import fused_norm_enabled, fused_rms_norms
from locft_dist.losses import forward_losses
from locft_dist.optim import build_optimizer, lr_at
from locft_dist.parallel.base import Strategy
from locft_dist.parallel.memory import log_host_memory
from locft_dist.prefix_cache import build_prefix_cache, uses_fixed_ownership
from locft_dist.prefix_offload import offload_prefix
from locft_dist.runlog import RunLog
from locft_dist.sampler import BreadthFirstSampler

logger = logging.getLogger(__name__)


@dataclass
class EpochStats:
    epoch: int
    mean_loss: float
    num_steps: int
    num_skipped_steps: int
    num_tokens: int
    seconds: float
    num_padded_tokens: int = 0
    """Positions computed, padding included (this rank's; ``num_tokens`` counts real tokens)."""


@dataclass
class TrainResult:
    pipeline: str
    epochs: list[EpochStats] = field(default_factory=list)
    num_steps: int = 0
    stopped_early: bool = False
    seconds: float = 0.0
    num_edit_passes: int = 0
    """Edits forwarded and backpropagated (the compute budget, comparable across pipelines)."""
    epoch_losses: list[float] = field(default_factory=list)
    """Mean loss of every finished epoch, including those run before a resume."""
    focus_losses: list[float] = field(default_factory=list)
    """Mean loss of every finished focus epoch (``train.focus_epochs``) over its examples."""

    @property
    def edits_per_second(self) -> float:
        return self.num_edit_passes / self.seconds if self.seconds else 0.0


def _clip(params: list[nn.Parameter], max_norm: float | None) -> None:
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_norm)


@dataclass
class TrainProgress:
    """What the loop needs besides the sampler to continue exactly; checkpointed with it."""

    epoch_losses: list[float] = field(default_factory=list)
    """Mean loss of every finished epoch (the early-stop rule reads the last one)."""
    partial_loss_sum: float = 0.0
    """Sum of per-edit losses so far in the current epoch (float64, exact through JSON)."""
    seconds: float = 0.0
    """Training time of the whole run so far, every attempt before a resume included."""
    num_edit_passes: int = 0
    """Edits forwarded and backpropagated in the whole run so far."""
    focus_indices: list[int] | None = None
    """The current focus epoch's examples in order (``train.focus_epochs``); None before the focus phase."""
    focus_consumed: int = 0
    """Examples of ``focus_indices`` already stepped on."""
    focus_epochs_done: int = 0
    focus_finished: bool = False
    """Set when a focus epoch found no example above ``train.focus_loss``."""
    focus_losses: list[float] = field(default_factory=list)
    """Mean loss of every finished focus epoch."""
    focus_partial_loss_sum: float = 0.0
    focus_steps: int = 0
    """Optimizer steps of the focus phase so far."""

    @property
    def in_focus(self) -> bool:
        return self.focus_indices is not None

    @property
    def focus_epoch_ended(self) -> bool:
        return self.focus_indices is not None and self.focus_consumed >= len(self.focus_indices)

    def focus_pending(self, cfg: TrainConfig) -> bool:
        """Whether focus steps remain (or a focus epoch's set is still to be measured)."""
        return not self.focus_finished and self.focus_epochs_done < cfg.focus_epochs

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


StepHook = Callable[[int, BreadthFirstSampler, TrainProgress], None]


class _LossRead:
    """A step's reduced ``[loss sum, tokens]``, copied to the host without waiting: on a GPU the copy is
    queued behind the step's backward, and reading it later waits for that step only, not for work queued
    after it."""

    def __init__(self, sums: torch.Tensor) -> None:
        self._event = None
        if sums.device.type == "cuda":
            host = torch.empty(sums.shape, dtype=sums.dtype, pin_memory=True)
            host.copy_(sums, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            sums = host
        self._sums = sums
        self._values: list[float] | None = None

    def values(self) -> list[float]:
        if self._values is None:
            if self._event is not None:
                self._event.synchronize()
            self._values = self._sums.tolist()
        return self._values


@dataclass
class _StepEnd:
    """A finished optimizer step whose bookkeeping may wait until the next step's passes are queued."""

    step: int
    epoch: int
    batch_edits: int
    lr: float
    loss: _LossRead
    stats: EpochStats
    skipped: bool = False
    sampler: BreadthFirstSampler | None = None
    """A copy of the sampler as it stood after this step (set when the bookkeeping is deferred)."""


def _should_stop_early(cfg: TrainConfig, progress: TrainProgress) -> bool:
    return bool(progress.epoch_losses) and (
        cfg.early_stop_loss is not None and progress.epoch_losses[-1] < cfg.early_stop_loss
    )


def train_breadth_first(
    model: nn.Module,
    examples: Sequence[EncodedExample],
    strategy: Strategy,
    cfg: TrainConfig,
    pad_id: int,
    *,
    sampler: BreadthFirstSampler | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    progress: TrainProgress | None = None,
    run_log: RunLog | None = None,
    on_step_end: StepHook | None = None,
) -> TrainResult:
    """LocFT-BF over ``examples``; ``sampler``/``optimizer``/``progress`` come from a checkpoint to resume.

    Every pass it makes (the prefix-cache fill, training, the focus phase's measuring) runs the model's
    RMSNorms fused where ``train.fused_norm`` says so."""
    with fused_rms_norms(model, fused_norm_enabled(cfg.fused_norm, strategy.device)):
        return _breadth_first(
            model,
            examples,
            strategy,
            cfg,
            pad_id,
            sampler=sampler,
            optimizer=optimizer,
            progress=progress,
            run_log=run_log,
            on_step_end=on_step_end,
        )


def _breadth_first(
    model: nn.Module,
    examples: Sequence[EncodedExample],
    strategy: Strategy,
    cfg: TrainConfig,
    pad_id: int,
    *,
    sampler: BreadthFirstSampler | None,
    optimizer: torch.optim.Optimizer | None,
    progress: TrainProgress | None,
    run_log: RunLog | None,
    on_step_end: StepHook | None,
) -> TrainResult:
    run_log = run_log or RunLog(None)
    optimizer = optimizer or strategy.build_optimizer(model, cfg)
    sampler = sampler or BreadthFirstSampler(len(examples), cfg.batch_size, cfg.seed)
    progress = progress or TrainProgress()
    total_steps = sampler.steps_per_epoch * cfg.epochs
    step = sampler.epoch * sampler.steps_per_epoch + (sampler.consumed % sampler.num_edits) // cfg.batch_size
    step += progress.focus_steps  # the breadth-first epochs are over when the focus phase took steps
    lengths = [len(e.input_ids) for e in examples]
    pass_cost = cfg.micro_batch_pass_cost or default_pass_cost(torch.device(strategy.device).type)
    done = sampler.epoch >= cfg.epochs or _should_stop_early(cfg, progress)  # resumed after the last step
    remaining = 0 if done else max(cfg.epochs * sampler.num_edits - sampler.consumed, 0)
    if progress.focus_pending(cfg):  # at most every example in every focus epoch
        remaining += (cfg.focus_epochs - progress.focus_epochs_done) * len(examples)
    cache = None
    if cfg.prefix_cache:  # it logs why it is off when too few passes remain (none, after the last step)
        cache = build_prefix_cache(model, examples, strategy, cfg, pad_id, remaining_passes=remaining)
    fixed_ownership = uses_fixed_ownership(strategy, cfg)
    if cache is not None:
        run_log.event("prefix_cache", rank=strategy.rank, **cache.summary())
        log_host_memory("after the prefix-cache fill")
    offload = offload_prefix(model, cache, strategy) if cache and cfg.prefix_cache_offload_prefix else None
    result = TrainResult("breadth_first", num_steps=step)
    start = time.perf_counter()
    seconds_before = progress.seconds
    bar = tqdm(
        total=total_steps,
        initial=step,
        desc="LocFT-BF",
        unit="step",
        disable=not (cfg.progress and strategy.is_main),
        dynamic_ncols=True,
    )

    def finish(done: _StepEnd) -> None:
        """A step's bookkeeping once its loss is read: progress, log, progress bar, the caller's hook."""
        batch_loss_sum, batch_tokens = done.loss.values()
        mean_loss = batch_loss_sum / done.batch_edits
        stats = done.stats
        progress.partial_loss_sum += batch_loss_sum
        stats.num_skipped_steps += int(done.skipped)
        stats.num_steps += 1
        result.num_edit_passes += done.batch_edits
        progress.num_edit_passes += done.batch_edits
        progress.seconds = seconds_before + time.perf_counter() - start
        if stats.num_steps == 1:
            strategy.check_optimizer(model, optimizer)
        step_sampler = done.sampler or sampler
        if step_sampler.consumed % step_sampler.num_edits == 0:  # the epoch is complete
            progress.epoch_losses.append(progress.partial_loss_sum / step_sampler.num_edits)
            progress.partial_loss_sum = 0.0
        run_log.event(
            "step",
            step=done.step,
            epoch=done.epoch,
            loss=mean_loss,
            lr=done.lr,
            skipped=done.skipped,
            batch_edits=done.batch_edits,
            tokens=int(batch_tokens),
        )
        edits_per_second = result.num_edit_passes / max(time.perf_counter() - start, 1e-9)
        bar.set_postfix(epoch=done.epoch, loss=f"{mean_loss:.4f}", edits_s=f"{edits_per_second:.1f}")
        bar.update(1)
        if on_step_end is not None:
            on_step_end(done.step, step_sampler, progress)

    def accumulate(indices: list[int], stats: EpochStats) -> torch.Tensor:
        """Forward and backward of this rank's share of a global batch: its gradients accumulate, and the
        batch's ``[loss sum, tokens]`` on this rank come back (not yet reduced)."""
        strategy.zero_grad(optimizer)
        batch_sums = torch.zeros(2, dtype=torch.float64, device=strategy.device)  # [loss, tokens]
        chunks = rank_chunks(
            indices,
            strategy.rank,
            strategy.world_size,
            cfg.micro_batch_size,
            lengths,
            modulo_owner=fixed_ownership,
            max_tokens=cfg.micro_batch_tokens,
            pass_cost=pass_cost,
        )
        for chunk, weight in chunks:
            if cache is not None:  # layers below the first trainable one ran once, before training
                per_edit, inputs = cache.losses(model, chunk, examples, pad_id)
            else:
                inputs = to_device(collate([examples[i] for i in chunk], pad_id), strategy.device)
                per_edit = forward_losses(model, inputs)  # CE or KL at target positions, x weight
            per_edit = per_edit * weight
            strategy.backward(per_edit.sum() / len(indices))
            batch_sums[0] += per_edit.detach().double().sum()
            real_tokens = sum(lengths[i] for i in chunk)  # from the host: no wait on the device here
            batch_sums[1] += real_tokens * weight
            stats.num_tokens += real_tokens * int(weight)
            stats.num_padded_tokens += inputs["attention_mask"].numel()
        return batch_sums

    def focus_phase() -> None:
        """``train.focus_epochs`` more epochs over the examples still above ``train.focus_loss``."""
        nonlocal step
        while progress.focus_pending(cfg):
            if progress.focus_indices is None or progress.focus_epoch_ended:
                candidates = list(range(len(examples)))  # a learned example can be unlearned again
                losses = measure_losses(
                    model,
                    examples,
                    candidates,
                    strategy,
                    pad_id,
                    batch_size=cfg.batch_size,
                    lengths=lengths,
                    cache=cache,
                    modulo_owner=fixed_ownership,
                    max_tokens=cfg.micro_batch_tokens,
                    pass_cost=pass_cost,
                    micro_batch_size=cfg.micro_batch_size,
                    progress=cfg.progress and strategy.is_main,
                )
                chosen = above(candidates, losses, cfg.focus_loss)
                run_log.event(
                    "focus_set",
                    focus_epoch=progress.focus_epochs_done,
                    measured=len(candidates),
                    above=len(chosen),
                    threshold=cfg.focus_loss,
                )
                logger.info(
                    "focus epoch %d: %d of %d examples above loss %.3g",
                    progress.focus_epochs_done,
                    len(chosen),
                    len(candidates),
                    cfg.focus_loss,
                )
                if not chosen:
                    progress.focus_finished = True
                    progress.focus_indices = progress.focus_indices or []
                    break
                progress.focus_indices = focus_order(chosen, cfg.seed, progress.focus_epochs_done)
                progress.focus_consumed = 0
                progress.focus_partial_loss_sum = 0.0
            left = len(progress.focus_indices) - progress.focus_consumed
            bar.total = max(bar.total, step + -(-left // cfg.batch_size))  # what is left of this focus epoch
            bar.refresh()
            focus, focus_epoch = progress.focus_indices, progress.focus_epochs_done
            stats = EpochStats(sampler.epoch + focus_epoch, 0.0, 0, 0, 0, 0.0)
            epoch_start = time.perf_counter()
            while progress.focus_consumed < len(focus):
                indices = focus[progress.focus_consumed : progress.focus_consumed + cfg.batch_size]
                batch_sums = accumulate(indices, stats)
                loss_sum, _ = strategy.all_reduce_sum(batch_sums).tolist()
                skipped = cfg.skip_loss_below is not None and loss_sum / len(indices) < cfg.skip_loss_below
                if not skipped:
                    strategy.optimizer_step(optimizer, cfg.lr, cfg.max_grad_norm)
                step += 1
                progress.focus_steps += 1
                progress.focus_consumed += len(indices)
                progress.focus_partial_loss_sum += loss_sum
                progress.num_edit_passes += len(indices)
                result.num_edit_passes += len(indices)
                progress.seconds = seconds_before + time.perf_counter() - start
                stats.num_steps += 1
                stats.num_skipped_steps += int(skipped)
                if progress.focus_consumed >= len(focus):
                    progress.focus_losses.append(progress.focus_partial_loss_sum / len(focus))
                    progress.focus_epochs_done += 1
                run_log.event(
                    "step",
                    step=step,
                    epoch=stats.epoch,
                    loss=loss_sum / len(indices),
                    lr=cfg.lr,
                    skipped=skipped,
                    batch_edits=len(indices),
                    focus=True,
                )
                bar.set_postfix(focus=focus_epoch, loss=f"{loss_sum / len(indices):.4f}")
                bar.update(1)
                if on_step_end is not None:
                    on_step_end(step, sampler, progress)
            stats.mean_loss = progress.focus_losses[-1]
            stats.seconds = time.perf_counter() - epoch_start
            result.epochs.append(stats)
            run_log.event("epoch", focus=True, **stats.__dict__)
            logger.info(
                "focus epoch %d: mean loss %.4f over %d examples, %d steps, %.1fs",
                focus_epoch,
                stats.mean_loss,
                len(focus),
                stats.num_steps,
                stats.seconds,
            )

    with compiled_layers(model, cfg.compile):  # the layers training runs, fused (train.compile)
        while sampler.epoch < cfg.epochs and not _should_stop_early(cfg, progress):
            epoch = sampler.epoch
            epoch_start = time.perf_counter()
            stats = EpochStats(epoch, 0.0, 0, 0, 0, 0.0)
            pending: _StepEnd | None = None
            for batch in sampler.epoch_batches():
                batch_sums = accumulate(batch.indices, stats)
                if pending is not None:  # the previous step's bookkeeping, while this step runs on the device
                    finish(pending)
                    pending = None
                reduced = strategy.all_reduce_sum(batch_sums)
                epoch_ends = sampler.consumed % sampler.num_edits == 0
                lr = lr_at(step, cfg, total_steps)
                stepped = _StepEnd(step + 1, epoch, len(batch.indices), lr, _LossRead(reduced), stats)
                if cfg.skip_loss_below is not None:  # only this rule makes the optimizer wait for the loss
                    stepped.skipped = stepped.loss.values()[0] / len(batch.indices) < cfg.skip_loss_below
                if not stepped.skipped:
                    strategy.optimizer_step(optimizer, lr, cfg.max_grad_norm)
                step += 1
                # the epoch's mean loss decides what comes next: settle it now
                if epoch_ends or not strategy.defers_step_bookkeeping:
                    finish(stepped)
                else:
                    stepped.sampler = copy.copy(sampler)  # as it stands after this step, for the hook
                    pending = stepped
            stats.mean_loss = progress.epoch_losses[-1]
            stats.seconds = time.perf_counter() - epoch_start
            result.epochs.append(stats)
            run_log.event("epoch", **stats.__dict__)
            (logger.debug if not bar.disable else logger.info)(  # the bar already shows it
                "epoch %d: mean loss %.4f over %d steps (%d skipped), %.1fs",
                epoch,
                stats.mean_loss,
                stats.num_steps,
                stats.num_skipped_steps,
                stats.seconds,
            )
        if _should_stop_early(cfg, progress) and sampler.epoch < cfg.epochs:
            result.stopped_early = True
            logger.info(
                "epoch mean loss %.4g < early_stop_loss %.4g: stopped after %d epochs",
                progress.epoch_losses[-1],
                cfg.early_stop_loss,
                sampler.epoch,
            )
        focus_phase()
    bar.close()
    if offload is not None:  # evaluation and the caller need the whole model
        offload.restore()
    result.num_steps = step
    result.epoch_losses = list(progress.epoch_losses)
    result.focus_losses = list(progress.focus_losses)
    result.seconds = time.perf_counter() - start
    return result


def train_depth_first(
    model: nn.Module,
    examples: Sequence[EncodedExample],
    strategy: Strategy,
    cfg: TrainConfig,
    pad_id: int,
    *,
    run_log: RunLog | None = None,
) -> TrainResult:
    """The depth-first baseline: one edit at a time to convergence, in a seeded order, batch size 1."""
    if strategy.world_size != 1:
        raise ValueError("train.pipeline=depth_first is a single-process baseline; use dist.strategy=none")
    run_log = run_log or RunLog(None)
    params = [p for _, p in strategy.trainable_parameters(model)]
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    result = TrainResult("depth_first")
    start = time.perf_counter()
    losses: list[float] = []
    for position, index in enumerate(
        tqdm(
            order,
            desc="depth-first",
            unit="edit",
            disable=not (cfg.progress and strategy.is_main),
            dynamic_ncols=True,
        )
    ):
        optimizer = build_optimizer(params, cfg)
        inputs = {k: v.to(strategy.device) for k, v in collate([examples[index]], pad_id).items()}
        loss_value = math.inf
        steps = 0
        for steps in range(cfg.depth_first_max_steps):  # noqa: B007
            optimizer.zero_grad(set_to_none=True)
            loss = forward_losses(model, inputs).mean()
            loss_value = loss.item()
            result.num_edit_passes += 1
            if loss_value < cfg.depth_first_stop_loss:
                break
            strategy.backward(loss)
            _clip(params, cfg.max_grad_norm)
            optimizer.step()
            result.num_steps += 1
        losses.append(loss_value)
        run_log.event("edit", position=position, edit=index, loss=loss_value, steps=steps + 1)
    result.seconds = time.perf_counter() - start
    mean = sum(losses) / len(losses)
    result.epochs.append(EpochStats(0, mean, result.num_steps, 0, 0, result.seconds))
    result.epoch_losses = [mean]
    logger.info(
        "depth-first: %d edits, %d steps, mean final loss %.4f, %.1fs",
        len(order),
        result.num_steps,
        mean,
        result.seconds,
    )
    return result
