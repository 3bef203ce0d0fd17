"""Tokenized edits kept on disk: one flat id array plus offsets, memory-mapped by later runs.

A 100K-edit file costs ~50 s to parse and tokenize and, held as Python objects (records, tuples of ints),
several hundred MiB of host memory per rank. The encoded set is written once to a cache file keyed by the
edit file's sha256, the loader settings, every ``Encoding`` field with the encoder's version, and the
tokenizer (its definition, special ids and chat template); a later run, a resumed run and the other ranks
map that file instead and do not parse the edit file at all: the validated records are kept beside it
(``edits/record_cache.py``) and read one at a time by evaluation and augmentation.

File layout (native little-endian): ``MAGIC``, a uint64 header length, a JSON header (key, counts, the
payload's sha256, the edit set's fingerprint and load summary), zero padding to 8 bytes, then ``offsets``
(int64, n+1), ``num_prompt`` (int32, n), padding, ``ids`` (int32). The file is written to a temporary name
and renamed, so a reader never sees a half-written one; a file that fails any check is rebuilt with a
warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np

from locft_dist import outputs
from locft_dist.edits.encode import EncodedExample, Encoding, encode_pair, encode_pairs
from locft_dist.edits.formats import load_edits
from locft_dist.edits.framed_file import check_sha256, read_header
from locft_dist.edits.record_cache import CorruptRecordsError, read_records, write_records
from locft_dist.edits.schema import EditRequest, edits_fingerprint
from locft_dist.errors import EncodingError

logger = logging.getLogger(__name__)

MAGIC = b"LOCFTTOK"
VERSION = 1
ENCODE_CHUNK = 8192
"""Edits tokenized per batched tokenizer call: bounds the tokenizer's transient Python lists."""


class TokenTable(Sequence[EncodedExample]):
    """The encoded edits as flat arrays; ``table[i]`` builds edit i's ``EncodedExample`` on demand."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray, num_prompt: np.ndarray) -> None:
        if len(offsets) != len(num_prompt) + 1 or int(offsets[-1]) != len(ids):
            raise ValueError("offsets, num_prompt and ids do not describe the same edits")
        self.ids = ids
        self.offsets = offsets
        self.num_prompt = num_prompt

    def __len__(self) -> int:
        return len(self.num_prompt)

    @overload
    def __getitem__(self, index: int) -> EncodedExample: ...
    @overload
    def __getitem__(self, index: slice) -> list[EncodedExample]: ...
    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        start, stop = int(self.offsets[index]), int(self.offsets[index + 1])
        return EncodedExample(tuple(self.ids[start:stop].tolist()), int(self.num_prompt[index]))

    def __iter__(self) -> Iterator[EncodedExample]:
        return (self[i] for i in range(len(self)))

    def lengths(self) -> list[int]:
        return np.diff(self.offsets).tolist()


@dataclass
class TokenizedEdits:
    """What a run needs from its edit file; ``requests`` is None when not asked for, and a mapped
    ``RecordTable`` (records parsed on access) when read through the cache."""

    examples: TokenTable
    requests: Sequence[EditRequest] | None
    fingerprint: str
    format: str
    num_skipped: int
    num_duplicates: int
    cache_path: Path | None
    from_cache: bool


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "locft-dist" / "tokens"


def file_sha256(path: str | Path) -> str | None:
    """The file's sha256, or None when it cannot be read (the loader then reports why)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides the ids: the tokenizer's class, its full definition (or vocabulary), special ids and
    chat template."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode("utf-8"))
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
    specials = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    digest.update(json.dumps([specials, tokenizer("a b")["input_ids"]]).encode())
    digest.update(json.dumps(getattr(tokenizer, "chat_template", None)).encode("utf-8"))
    return digest.hexdigest()


def cache_key(file_digest: str, tokenizer, settings: dict[str, Any]) -> str:
    blob = json.dumps(
        {"version": VERSION, "file": file_digest, "tokenizer": tokenizer_fingerprint(tokenizer), **settings},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def encode_table(tokenizer, requests: Sequence[EditRequest], where: str, encoding: Encoding) -> TokenTable:
    """Encode in chunks into flat arrays; an edit that cannot be encoded is named by its number."""
    ids_parts: list[np.ndarray] = []
    lengths = np.zeros(len(requests), dtype=np.int64)
    num_prompt = np.zeros(len(requests), dtype=np.int32)
    for start in range(0, len(requests), ENCODE_CHUNK):
        chunk = requests[start : start + ENCODE_CHUNK]
        try:
            encoded = encode_pairs(
                tokenizer, [r.prompt for r in chunk], [r.target_new for r in chunk], encoding
            )
        except EncodingError:
            for number, request in enumerate(chunk, start=start + 1):  # find the offending edit
                try:
                    encode_pair(tokenizer, request.prompt, request.target_new, encoding)
                except EncodingError as err:
                    raise EncodingError(f"{where}: edit {number}: {err}") from None
            raise
        for row, example in enumerate(encoded, start=start):
            lengths[row] = len(example.input_ids)
            num_prompt[row] = example.num_prompt_tokens
        ids_parts.append(np.fromiter((i for e in encoded for i in e.input_ids), dtype=np.int32))
    offsets = np.zeros(len(requests) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, dtype=np.int32)
    return TokenTable(ids, offsets, num_prompt)


def _pad8(n: int) -> int:
    return -n % 8


def write_cache(path: Path, key: str, table: TokenTable, meta: dict[str, Any]) -> None:
    """Write the table to a temporary file beside ``path`` and rename it into place."""
    payload = [
        np.ascontiguousarray(table.offsets, dtype=np.int64).tobytes(),
        np.ascontiguousarray(table.num_prompt, dtype=np.int32).tobytes(),
    ]
    payload.append(b"\0" * _pad8(len(payload[1])))
    payload.append(np.ascontiguousarray(table.ids, dtype=np.int32).tobytes())
    digest = hashlib.sha256()
    for part in payload:
        digest.update(part)
    header = {
        "key": key,
        "num_edits": len(table),
        "num_ids": len(table.ids),
        "sha256": digest.hexdigest(),
        **meta,
    }
    blob = json.dumps(header, sort_keys=True).encode("utf-8")
    blob += b" " * _pad8(len(MAGIC) + 8 + len(blob))
    with outputs.atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(MAGIC + struct.pack("<Q", len(blob)) + blob)
        for part in payload:
            handle.write(part)
        handle.flush()
        os.fsync(handle.fileno())


class CorruptCacheError(Exception):
    """The cache file is not a complete, matching token cache (it is rebuilt)."""


def read_cache(path: Path, key: str) -> tuple[TokenTable, dict[str, Any]]:
    """Map a cache file after checking its magic, key, sizes and payload sha256."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        header, start = read_header(handle, size, MAGIC, key, CorruptCacheError, "token cache file")
        try:
            n, num_ids = int(header["num_edits"]), int(header["num_ids"])
        except (ValueError, KeyError, TypeError) as err:
            raise CorruptCacheError(f"unreadable header ({err})") from None
        prompt_at = start + 8 * (n + 1)
        ids_at = prompt_at + 4 * n + _pad8(4 * n)
        if size != ids_at + 4 * num_ids:
            raise CorruptCacheError(f"{size} bytes, expected {ids_at + 4 * num_ids}")
        check_sha256(handle, header.get("sha256"), CorruptCacheError)
    offsets = np.memmap(path, dtype=np.int64, mode="r", offset=start, shape=(n + 1,))
    num_prompt = np.memmap(path, dtype=np.int32, mode="r", offset=prompt_at, shape=(n,))
    ids = np.memmap(path, dtype=np.int32, mode="r", offset=ids_at, shape=(num_ids,))
    try:
        return TokenTable(ids, offsets, num_prompt), header
    except ValueError as err:
        raise CorruptCacheError(str(err)) from None


def _cached_requests(
    cache_path: Path, key: str, path: str, format: str, skip_invalid: bool, limit: int | None
) -> Sequence[EditRequest]:
    """The records written beside the token cache, mapped and parsed one at a time on access; the edit file
    is parsed (and the record file rewritten) only when that file is missing or fails its checks."""
    record_path = cache_path.with_suffix(".rec")
    try:
        return read_records(record_path, key)
    except (CorruptRecordsError, OSError) as err:
        if record_path.exists():
            logger.warning("record cache %s is unusable (%s): rebuilding it", record_path, err)
    requests = load_edits(path, format, skip_invalid=skip_invalid, limit=limit).requests
    try:
        write_records(record_path, key, requests)
    except OSError as err:
        logger.warning("cannot write the record cache %s (%s)", record_path, err)
    return requests


def tokenized_edits(
    path: str,
    tokenizer,
    *,
    format: str = "auto",
    skip_invalid: bool = False,
    limit: int | None = None,
    encoding: Encoding,
    cache_dir: str | Path | None,
    need_requests: bool,
) -> TokenizedEdits:
    """The encoded edits, from the cache when it holds them; ``cache_dir=None`` turns the cache off.

    The parsed records are returned only when ``need_requests``; otherwise they are dropped as soon as the
    ids are encoded.
    """
    digest = file_sha256(path) if cache_dir is not None else None
    cache_path = key = None
    if digest is not None:
        settings = {"format": format, "skip_invalid": skip_invalid, "limit": limit, **encoding.cache_key()}
        key = cache_key(digest, tokenizer, settings)
        cache_path = Path(cache_dir) / f"{key}.tok"
        if cache_path.is_file():
            try:
                table, header = read_cache(cache_path, key)
            except (CorruptCacheError, OSError) as err:
                logger.warning("token cache %s is unusable (%s): rebuilding it", cache_path, err)
            else:
                requests = (
                    _cached_requests(cache_path, key, path, format, skip_invalid, limit)
                    if need_requests
                    else None
                )
                logger.info("%d encoded edits mapped from the token cache %s", len(table), cache_path)
                return TokenizedEdits(
                    table,
                    requests,
                    header["fingerprint"],
                    header["format"],
                    header["num_skipped"],
                    header["num_duplicates"],
                    cache_path,
                    True,
                )
    edit_set = load_edits(path, format, skip_invalid=skip_invalid, limit=limit)
    table = encode_table(tokenizer, edit_set.requests, str(path), encoding)
    meta = {
        "fingerprint": edits_fingerprint(edit_set.requests),
        "format": edit_set.format,
        "num_skipped": edit_set.num_skipped,
        "num_duplicates": edit_set.num_duplicates,
    }
    if cache_path is not None:
        try:
            write_cache(cache_path, key, table, meta)
            write_records(cache_path.with_suffix(".rec"), key, edit_set.requests)
            logger.info("wrote the token cache %s", cache_path)
        except OSError as err:
            logger.warning("cannot write the token cache %s (%s): continuing without it", cache_path, err)
    return TokenizedEdits(
        table,
        edit_set.requests if need_requests else None,
        meta["fingerprint"],
        meta["format"],
        meta["num_skipped"],
        meta["num_duplicates"],
        cache_path,
        False,
    )
