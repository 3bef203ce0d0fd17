"""One attempt at a run: signals, the directory lock, the compatibility check, the phases, the run log.

``Run.open`` decides, on the main rank and for every rank, what this attempt does: start a new run, continue
one (resume training, or only export/evaluate what is left), or nothing (finished). Everything that reads
or writes the directory happens on the main rank under the lock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from locft_dist import outputs
from locft_dist.config import RunConfig
from locft_dist.errors import LocftError, RunDirError
from locft_dist.parallel.base import Strategy
from locft_dist.run.compat import Identity, check_compatible, compare, flat_config
from locft_dist.run.layout import RunDir, eval_settings
from locft_dist.run.lock import RunDirLock
from locft_dist.run.signals import RunSignals
from locft_dist.runlog import RunLog
from locft_dist.tracking import WandbSink

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Plan:
    """What is left of the run, the same on every rank."""

    delta_done: bool
    evaluated: bool
    finished: bool


class Run:
    """Use as a context manager around one attempt; ``open`` then ``start`` before training."""

    def __init__(self, cfg: RunConfig, strategy: Strategy) -> None:
        self.cfg = cfg
        self.strategy = strategy
        self.dir = RunDir(cfg.output.dir)
        self.lock = RunDirLock(cfg.output.dir)
        self.signals = RunSignals(is_main=strategy.is_main)
        self.log = RunLog(None)
        self._identity: Identity | None = None

    def __enter__(self) -> Run:
        self.signals.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.log.close()
        self.lock.release()
        self.signals.uninstall()

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """``fn()`` on the main rank; if it raises a user error, every rank raises together."""
        error, result = None, None
        if self.strategy.is_main:
            try:
                result = fn()
            except LocftError as err:
                error = err
        failed = self.strategy.all_reduce_max(
            torch.tensor([int(error is not None)], device=self.strategy.device)
        )
        if error is not None:
            raise error
        if failed.item():
            raise RunDirError(f"{self.dir.path}: the main rank stopped the run (see its message)")
        return result

    def check_writable(self) -> None:
        """Fail at once, on every rank, if ``output.dir`` cannot be written (before any long work)."""
        self.on_main(lambda: outputs.check_writable(self.dir.path, "output.dir", directory=True))

    def open(self, identity: Callable[[], Identity]) -> Plan:
        """Lock ``output.dir`` and compare with the run it holds; returns what is left to do."""
        plan = self.on_main(lambda: self._open(identity()))
        flags = [int(x) for x in (plan.delta_done, plan.evaluated)] if plan is not None else [0, 0]
        delta_done, evaluated = (bool(x) for x in self.strategy.all_reduce_max(torch.tensor(flags)).tolist())
        return Plan(delta_done, evaluated, delta_done and (evaluated or not self.cfg.eval.enabled))

    def _open(self, identity: Identity) -> Plan:
        self.lock.acquire()
        self._identity = identity
        previous = self.dir.previous_config()
        if previous is None:  # no run here, or leftovers of one: the checkpoints' own checks still apply
            if self.cfg.output.overwrite:
                self.dir.clear()
            return Plan(False, False, False)
        self.dir.load_record()
        comparison = compare(
            flat_config(previous), self.dir.identity, flat_config(self.cfg.to_dict()), identity
        )
        if comparison.refused and self.cfg.output.overwrite:
            logger.warning("output.overwrite=true: deleting the other run in %s", self.dir.path)
            self.dir.clear()
        else:
            check_compatible(self.dir.path, comparison)
            if self.cfg.output.overwrite:
                logger.info(
                    "%s holds this same run: continuing it (output.overwrite replaces only another run; "
                    "resuming is exact, so starting afresh would give the same result)",
                    self.dir.path,
                )
        delta_done = self.dir.delta_done()
        evaluated = delta_done and self.dir.evaluated(eval_settings(self.cfg.eval))
        return Plan(delta_done, evaluated, False)

    def start(self, config_yaml: str) -> RunLog:
        """Save this attempt's config and identity, open the run log (and wandb) on the main rank."""
        if self.strategy.is_main:
            assert self._identity is not None, "open() first"
            self.dir.start(config_yaml, self._identity)
        self.log = RunLog(self.dir.log, enabled=self.strategy.is_main)
        if self.strategy.is_main:
            self.log.add_sink(WandbSink.start(self.cfg, self.dir.path))
        return self.log

    def done(self, phase: str) -> bool:
        """Whether ``phase`` was recorded finished (main rank's view; only the main rank writes)."""
        return self.dir.phase(phase) is not None

    def mark(self, phase: str, **info: Any) -> None:
        if self.strategy.is_main:
            self.dir.mark(phase, **info)
        self.log.event(phase, **info)
