"""The frame shared by the token cache and the record cache: ``MAGIC``, a uint64 header length, a JSON
header, then arrays the caller maps. Reading checks what every such file must satisfy (magic, header,
key, payload checksum); what the arrays mean stays with each cache."""

from __future__ import annotations

import hashlib
import json
import struct
from typing import IO, Any


def read_header(
    handle: IO[bytes], size: int, magic: bytes, key: str, error: type[Exception], what: str
) -> tuple[dict[str, Any], int]:
    """The JSON header of an open file and the offset just past it; ``error`` for anything that does not
    match (another file type, a truncated or unreadable header, another key)."""
    if handle.read(len(magic)) != magic:
        raise error(f"not a {what}")
    raw = handle.read(8)
    if len(raw) != 8:
        raise error("truncated header")
    (header_len,) = struct.unpack("<Q", raw)
    if header_len > size:
        raise error("header length past the end of the file")
    try:
        header = json.loads(handle.read(header_len))
        if not isinstance(header, dict):
            raise TypeError("not a JSON object")
    except (ValueError, TypeError) as err:
        raise error(f"unreadable header ({err})") from None
    if header.get("key") != key:
        raise error("written for other edits or settings")
    return header, len(magic) + 8 + header_len


def check_sha256(handle: IO[bytes], expected: Any, error: type[Exception]) -> None:
    """Hash the file from the handle's position to its end against ``expected``."""
    digest = hashlib.sha256()
    while block := handle.read(1 << 20):
        digest.update(block)
    if digest.hexdigest() != expected:
        raise error("payload checksum mismatch")
