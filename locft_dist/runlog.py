"""``log.jsonl``: one JSON object per event (step, epoch, eval, ...), written by the main rank only.

Trackers (wandb) see the same events through ``add_sink``, so the training loop logs in one place.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger("locft")


class Sink(Protocol):
    """Receives every event after it is written (``record`` includes ``event`` and ``time``)."""

    def event(self, kind: str, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class RunLog:
    """Appends events to ``log.jsonl`` (line-buffered so a killed run keeps what it logged)."""

    def __init__(self, path: str | Path | None, enabled: bool = True) -> None:
        self.start = time.time()
        self._file = None
        self._enabled = enabled
        self._sinks: list[Sink] = []
        if path is not None and enabled:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115

    def add_sink(self, sink: Sink | None) -> None:
        if sink is not None and self._enabled:
            self._sinks.append(sink)

    def event(self, kind: str, **fields: Any) -> None:
        if self._file is None and not self._sinks:
            return
        record = {"event": kind, "time": round(time.time() - self.start, 3), **fields}
        if self._file is not None:
            self._file.write(json.dumps(record, default=_jsonable) + "\n")
        for sink in self._sinks:
            sink.event(kind, record)

    def close(self) -> None:
        """Idempotent: also called on the way out of a failed or preempted run."""
        if self._file is not None:
            self._file.close()
            self._file = None
        sinks, self._sinks = self._sinks, []
        for sink in sinks:
            sink.close()


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def setup_logging(is_main: bool, level: int = logging.INFO) -> None:
    """Plain timestamped logs on the main rank; warnings only elsewhere."""
    logging.basicConfig(
        level=level if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
