"""Writing what people share: atomically, with the permissions the umask asks for, after a writability check.

Every output (delta, edited model, metrics, reports, converted edit files, run files) is written to a
temporary name beside its destination and renamed, so a crash never leaves half a file. ``mkstemp`` and
``mkdtemp`` create 0600/0700 entries whatever the umask; an output that kept those modes could not be read
by colleagues on a shared cluster, so the temporary entry gets the mode a plain ``open``/``mkdir`` would
give (0666/0777 minus the umask) before the rename. Destinations are checked before any long work starts,
so a read-only file system or a parent that is a file is a clear error naming the path, not an ``OSError``
after hours of training or evaluation.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from locft_dist.errors import StorageError


def current_umask() -> int:
    """The process umask, read without changing it where the system allows (Linux ``/proc``)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: read by setting, then put it back at once
    os.umask(mask)
    return mask


def default_mode(*, directory: bool = False) -> int:
    """The mode ``open``/``mkdir`` would give a new file/directory under the current umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


@contextlib.contextmanager
def atomic_path(path: str | Path, *, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; on success it gets ``mode`` (default: what the umask
    gives a new file) and replaces ``path``.

    On any failure (the ``with`` body raising, a full disk) the temporary file is removed and an existing
    ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, default_mode() if mode is None else mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (fsynced before the rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, payload: Any, **dump_kwargs: Any) -> Path:
    return write_text(path, json.dumps(payload, **{"indent": 1, **dump_kwargs}) + "\n")


def make_temp_dir(parent: str | Path, prefix: str) -> Path:
    """A new directory in ``parent`` with the umask's mode (``mkdtemp`` alone gives 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, default_mode(directory=True))
    return path


def check_writable(path: str | Path, what: str, *, directory: bool = False) -> Path:
    """Raise ``StorageError`` naming ``what`` and the path unless ``path`` can be created or written.

    ``directory``: ``path`` is a directory to create or write into (``output.dir``, ``apply --out``);
    otherwise a file whose parent directory must be writable. Nothing is created.
    """
    path = Path(path).expanduser().absolute()
    if directory and path.exists() and not path.is_dir():
        raise StorageError(f"{what} {path} is a file, not a directory")
    if not directory and path.is_dir():
        raise StorageError(f"{what} {path} is a directory, not a file")
    probe = path if directory else path.parent
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise StorageError(f"{what} {path}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only_fs(probe) else "permission denied"
        raise StorageError(f"{what} {path}: cannot write in {probe} ({reason})")
    return path


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False
