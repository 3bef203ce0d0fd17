"""One run per output directory: an ``fcntl`` lock on ``output.dir/.locft.lock``, held by the main rank.

The kernel drops the lock when its holder exits, however it exits (kill -9 included), so a lock file left
by a dead run is simply taken over: only a live process can refuse a new run. The file records the holder's
host and pid for the message. ``flock`` on network file systems depends on the mount (NFSv4 and Lustre
with ``flock`` support it); on others the lock is advisory per host.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from locft_dist.errors import RunDirBusyError

LOCK_NAME = ".locft.lock"


class RunDirLock:
    """Exclusive, non-blocking lock of a run directory; ``release`` (or process exit) frees it."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise ``RunDirBusyError`` naming the live holder."""
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask decides, as for every output
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise RunDirBusyError(
                f"{self.path.parent} is in use by a running job ({holder}); wait for it to finish, stop it, "
                "or choose another output.dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
