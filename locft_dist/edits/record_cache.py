"""The parsed edit records kept beside the token cache, read one record at a time.

Evaluation and augmentation need the records (prompts, rephrasings, locality probes), not only the ids.
Parsing and validating a 100K-edit file costs tens of seconds and hundreds of MiB per rank; when the token
cache is written, the validated records are written next to it (``<key>.rec``) as canonical JSON, one
object per record, with an offset table. A later run, a resumed run and every rank memory-map that file
and parse a record only when it is read, so a rank that touches its share touches only its share.

Layout (native little-endian): ``MAGIC``, a uint64 header length, a JSON header (key, count, payload
sha256), zero padding to 8 bytes, ``offsets`` (int64, n+1), then the records (UTF-8 JSON, back to back).
Written to a temporary name and renamed; a file that fails a check is rebuilt from the edit file.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import overload

import numpy as np

from locft_dist.edits.framed_file import check_sha256, read_header
from locft_dist.edits.schema import EditRequest

MAGIC = b"LOCFTREC"


class CorruptRecordsError(Exception):
    """Not a complete record file for this key (it is rebuilt)."""


class RecordTable(Sequence[EditRequest]):
    """Edit records backed by a mapped file; ``table[i]`` parses record ``i`` on demand."""

    def __init__(self, offsets: np.ndarray, payload: np.ndarray) -> None:
        self.offsets = offsets
        self.payload = payload

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @overload
    def __getitem__(self, index: int) -> EditRequest: ...
    @overload
    def __getitem__(self, index: slice) -> list[EditRequest]: ...
    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        raw = self.payload[int(self.offsets[index]) : int(self.offsets[index + 1])].tobytes()
        return EditRequest.from_json(json.loads(raw))

    def __iter__(self) -> Iterator[EditRequest]:
        return (self[i] for i in range(len(self)))


def _pad8(n: int) -> int:
    return -n % 8


def write_records(path: Path, key: str, requests: Sequence[EditRequest]) -> None:
    """Write to a temporary file beside ``path``, then rename."""
    blobs = [json.dumps(r.to_json(), ensure_ascii=False).encode("utf-8") for r in requests]
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in blobs], out=offsets[1:])
    payload = b"".join(blobs)
    header = json.dumps(
        {"key": key, "num_records": len(blobs), "sha256": hashlib.sha256(payload).hexdigest()}
    ).encode("utf-8")
    header += b" " * _pad8(len(MAGIC) + 8 + len(header))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(MAGIC + struct.pack("<Q", len(header)) + header)
            handle.write(offsets.tobytes())
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_records(path: Path, key: str) -> RecordTable:
    """Map a record file after checking its magic, key, size and payload sha256."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        header, start = read_header(handle, size, MAGIC, key, CorruptRecordsError, "record file")
        try:
            n = int(header["num_records"])
        except (ValueError, KeyError, TypeError) as err:
            raise CorruptRecordsError(f"unreadable header ({err})") from None
        payload_at = start + 8 * (n + 1)
        if size < payload_at:
            raise CorruptRecordsError("truncated offsets")
        handle.seek(payload_at)
        check_sha256(handle, header.get("sha256"), CorruptRecordsError)
    offsets = np.memmap(path, dtype=np.int64, mode="r", offset=start, shape=(n + 1,))
    if int(offsets[0]) != 0 or int(offsets[-1]) != size - payload_at or np.any(np.diff(offsets) < 0):
        raise CorruptRecordsError("offsets do not describe the payload")
    payload = np.memmap(path, dtype=np.uint8, mode="r", offset=payload_at, shape=(size - payload_at,))
    return RecordTable(offsets, payload)
