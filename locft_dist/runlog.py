"""``log.jsonl``: one JSON object per event (step, epoch, eval, ...), written by the main rank only."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("locft")


class RunLog:
    """Appends events to ``log.jsonl`` (line-buffered so a killed run keeps what it logged)."""

    def __init__(self, path: str | Path | None, enabled: bool = True) -> None:
        self.start = time.time()
        self._file = None
        if path is not None and enabled:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115

    def event(self, kind: str, **fields: Any) -> None:
        if self._file is None:
            return
        record = {"event": kind, "time": round(time.time() - self.start, 3), **fields}
        self._file.write(json.dumps(record, default=_jsonable) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


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
