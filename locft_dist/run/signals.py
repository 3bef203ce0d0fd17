"""Stopping a run cleanly on SIGTERM/SIGUSR1 (preemption, time limits) and SIGINT (Ctrl-C).

While training, a handler only sets a flag: saving inside a handler would race the training step and the
other ranks' collectives, so the ranks all-reduce the flag at the next step boundary, save a checkpoint
together and stop with ``EXIT_PREEMPTED``. Anywhere else (loading, evaluating, writing the delta) there is
nothing to save: every output is written atomically and the run directory records the finished phases, so
the handler stops the run at once and a rerun does what is left. A second Ctrl-C stops at once even while
training (the work since the last checkpoint is lost; the message says so).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

logger = logging.getLogger(__name__)

EXIT_PREEMPTED = 75
"""Exit code of a clean stop (a signal or Ctrl-C): what is done is kept; rerun the same command."""
EXIT_INTERRUPTED = 130
"""Exit code of a forced stop (a second Ctrl-C while training: the work since the last checkpoint is lost)."""

RESUME_HINT = "rerun the same command to resume"


class Stopped(BaseException):
    """A clean stop: raised at a step boundary after the checkpoint is saved, or by the handler outside
    training. A ``BaseException`` (like ``KeyboardInterrupt``) so that no ``except Exception`` swallows it."""

    exit_code = EXIT_PREEMPTED


def _name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum is not None else "a signal on another rank"


class RunSignals:
    """The run's handlers for SIGTERM, SIGUSR1 and SIGINT, installed for the whole run (main thread only)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, *, is_main: bool = True) -> None:
        self.is_main = is_main
        self.received: int | None = None
        self.phase = "starting"
        self._deferred = False
        self._num_interrupts = 0
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Install the handlers, remembering the previous ones for ``uninstall``."""
        if self._previous or threading.current_thread() is not threading.main_thread():
            return  # signals reach the main thread only; a run started elsewhere keeps the defaults
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> RunSignals:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    @contextlib.contextmanager
    def deferred(self, phase: str) -> Iterator[None]:
        """Within the block a signal only sets the flag, read by ``should_stop`` at step boundaries."""
        previous = self.phase
        self.phase, self._deferred = phase, True
        try:
            yield
        finally:
            self.phase, self._deferred = previous, False

    def _say(self, text: str) -> None:
        if self.is_main:  # write(2) directly: a handler must not take the logging module's locks
            with contextlib.suppress(OSError):
                os.write(2, f"locft: {text}\n".encode())

    def _handle(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT:
            self._num_interrupts += 1
        if self._deferred:
            if signum == signal.SIGINT and self._num_interrupts > 1:
                self._say("second Ctrl-C: stopping at once; the work since the last checkpoint is lost")
                raise KeyboardInterrupt
            if self.received is None:
                self.received = signum
                again = " (Ctrl-C again stops at once, losing it)" if signum == signal.SIGINT else ""
                self._say(f"{_name(signum)}: saving a checkpoint after this step, then stopping{again}")
            return
        self.received = signum
        raise Stopped(
            f"stopped by {_name(signum)} while {self.phase}; finished phases are kept: {RESUME_HINT}"
        )

    def should_stop(
        self, all_reduce_max: Callable[[torch.Tensor], torch.Tensor], device: torch.device | str = "cpu"
    ) -> bool:
        """True on every rank if any rank got a signal (a sum all-reduce works too). Call on all ranks."""
        local = torch.tensor([0 if self.received is None else 1], dtype=torch.int32, device=device)
        stop = bool(all_reduce_max(local).item() > 0)
        if stop:
            logger.warning(
                "%s received (%s): saving a checkpoint and stopping with exit code %d",
                "Ctrl-C" if self.received == signal.SIGINT else "preemption signal",
                _name(self.received),
                EXIT_PREEMPTED,
            )
        return stop
