"""Read ZsRE, CounterFact, WikiBigEdit and canonical JSONL edit files into ``EditRequest`` lists.

Every problem a user can cause raises ``EditDataError`` naming the file, the 1-based record number (the
line number for JSONL) and the field, because a bad record deep in a 100K-line file is otherwise hopeless
to find. JSONL is read line by line; a JSON array file is parsed whole (the stdlib cannot stream it).

Targets (``target_new``, ``target_true``, probe answers) lose surrounding whitespace: the encoder adds the
separating space itself, and ZsRE ships ~100 targets with a stray leading space. Prompts are kept as-is.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from locft_dist import outputs
from locft_dist.edits.schema import EditRequest, LocalityProbe
from locft_dist.errors import EditDataError

logger = logging.getLogger(__name__)

FORMATS = ("zsre", "counterfact", "wikibigedit", "jsonl")
_MAX_REASONS = 3  # how many skip reasons the summary warning quotes
_WHITESPACE = b" \t\r\n"
_Item = dict[str, Any] | EditDataError  # a parsed record, or why it could not be read


@dataclass(frozen=True)
class EditSet:
    """The edits of one file plus what loading dropped, so callers can report it."""

    requests: list[EditRequest]
    path: str
    format: str  # the resolved format, never "auto"
    num_skipped: int  # invalid records skipped (skip_invalid=True)
    num_duplicates: int  # exact duplicate records dropped (same prompt, same target)

    def __len__(self) -> int:
        return len(self.requests)


class _FieldError(Exception):
    """(field, problem) for one field; the loader adds the file and record number."""


def _type_name(value: Any) -> str:
    names = {type(None): "null", dict: "object", list: "list", str: "str"}
    return names.get(type(value), type(value).__name__)


def _open(path: Path) -> BinaryIO:
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise EditDataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise EditDataError(f"{path}: is a directory, expected an edit file") from None
    except OSError as err:
        raise EditDataError(f"{path}: cannot read: {err.strerror}") from None


def _first_char(f: BinaryIO, path: Path) -> bytes:
    """The first non-space byte (b"" if none), leaving ``f`` positioned after any UTF-8 BOM."""
    head = f.read(4)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise EditDataError(f"{path}: file is UTF-16 encoded; edit files must be UTF-8")
    start = 3 if head.startswith(b"\xef\xbb\xbf") else 0
    f.seek(start)
    while chunk := f.read(1 << 16):
        stripped = chunk.lstrip(_WHITESPACE)
        if stripped:
            f.seek(start)
            return stripped[:1]
    return b""


def _records(path: Path) -> Iterator[tuple[int, _Item]]:
    """Yield (record number, object or record-level error); file-level problems raise at once."""
    with _open(path) as f:
        first = _first_char(f, path)
        if not first:
            raise EditDataError(f"{path}: no records (empty file)")
        if first == b"[":
            yield from _array_records(path, f.tell(), f.read())
            return
        offset = f.tell()
        for lineno, raw in enumerate(f, start=1):
            if raw.strip(_WHITESPACE):
                yield lineno, _parse_line(raw, f"{path}: record {lineno}", lineno, offset)
            offset += len(raw)


def _parse_line(raw: bytes, where: str, lineno: int, offset: int) -> _Item:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        at = f"byte {offset + err.start} (line {lineno}, column {err.start + 1})"
        return EditDataError(f"{where}: not valid UTF-8 at {at}: {err.reason}")
    try:
        return _as_object(json.loads(text), where)
    except json.JSONDecodeError as err:
        hint = ""
        if lineno == 1 and text.lstrip().startswith("{"):
            hint = " (a JSON file must hold one object per line, or be an array of objects)"
        return EditDataError(f"{where}: invalid JSON at line {lineno}, column {err.colno}: {err.msg}{hint}")


def _array_records(path: Path, start: int, data: bytes) -> Iterator[tuple[int, _Item]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        at = f"byte {start + err.start} (line {line})"
        raise EditDataError(f"{path}: not valid UTF-8 at {at}: {err.reason}") from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        at = f"line {err.lineno}, column {err.colno}"
        raise EditDataError(f"{path}: invalid JSON at {at}: {err.msg}") from None
    if not records:
        raise EditDataError(f"{path}: no records (empty JSON array)")
    for num, record in enumerate(records, start=1):
        yield num, _as_object(record, f"{path}: record {num}")


def _as_object(record: Any, where: str) -> _Item:
    if isinstance(record, dict):
        return record
    return EditDataError(f"{where}: expected a JSON object, got {_type_name(record)}")


def iter_records(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (1-based record number, object) from a JSON array or JSONL file; JSONL numbers are lines.

    The layout is chosen by the first non-space character, so a canonical file may be either.
    """
    for num, record in _records(Path(path)):
        if isinstance(record, EditDataError):
            raise record
        yield num, record


def _guess_format(record: dict[str, Any]) -> str | None:
    if "src" in record and "alt" in record:
        return "zsre"
    if "ground_truth" in record or "case_id" in record:
        return "counterfact"
    if {"rephrase_prompt", "locality_prompt", "locality"} & record.keys():
        return "wikibigedit"
    if "prompt" in record and "target_new" in record:
        return "jsonl"
    return None


def _detect(record: dict[str, Any], path: str | Path, num: int) -> str:
    fmt = _guess_format(record)
    if fmt is None:
        keys = ", ".join(sorted(record)[:12]) or "none"
        raise EditDataError(
            f"{path}: record {num}: cannot detect the edit format from its keys ({keys}); expected ZsRE "
            "(src, alt), CounterFact (case_id/ground_truth), WikiBigEdit (rephrase_prompt, locality_prompt) "
            f"or canonical JSONL (prompt, target_new); or pass one of {', '.join(FORMATS)} explicitly"
        )
    return fmt


def detect_format(path: str | Path) -> str:
    """The format of ``path``, judged from the keys of its first record."""
    for num, record in iter_records(path):
        return _detect(record, path, num)
    raise AssertionError("unreachable: _records raises on a file without records")


def _text(record: dict[str, Any], key: str, *, required: bool = False, strip: bool = False) -> str | None:
    """A string field; absent/null/blank is None when optional, an error when required."""
    value = record.get(key)
    if value is None and key not in record and required:
        raise _FieldError(key, "missing (required)")
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise _FieldError(key, f"must be a non-empty string (got {_type_name(value)})")
    if not value.strip():
        if required:
            raise _FieldError(key, "must be a non-empty string (got an empty or whitespace-only string)")
        return None
    return value.strip() if strip else value


def _texts(value: Any, field: str, *, allow_str: bool = True) -> tuple[str, ...]:
    """A list of non-empty strings; a lone string is a one-element list where the source allows it."""
    if value is None or value == "":
        return ()
    if isinstance(value, str) and allow_str:
        return (value,) if value.strip() else ()
    if not isinstance(value, list):
        kind = "a string or a list of strings" if allow_str else "a list of strings"
        raise _FieldError(field, f"must be {kind} (got {_type_name(value)})")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            got = _type_name(item) if not isinstance(item, str) else "an empty string"
            raise _FieldError(f"{field}[{i}]", f"must be a non-empty string (got {got})")
    return tuple(value)


def _probes(prompts: Any, answers: Any, pkey: str, akey: str) -> tuple[LocalityProbe, ...]:
    """Pair locality prompts with answers; one prompt with a list of answers takes the first (aliases)."""
    ps = _texts(prompts, pkey)
    ans = tuple(a.strip() for a in _texts(answers, akey))
    if not ps and not ans:
        return ()
    if not ps:
        raise _FieldError(pkey, f"missing (required with '{akey}')")
    if not ans:
        raise _FieldError(akey, f"missing (required with '{pkey}')")
    if len(ps) == 1:
        return (LocalityProbe(ps[0], ans[0]),)
    if len(ans) != len(ps):
        raise _FieldError(akey, f"expected {len(ps)} answers, one per prompt in '{pkey}' (got {len(ans)})")
    return tuple(LocalityProbe(p, a) for p, a in zip(ps, ans, strict=True))


def _nested_locality(value: Any) -> tuple[LocalityProbe, ...]:
    """EasyEdit's ``locality``: {name: {prompt, ground_truth} | [{prompt, ground_truth}, ...]} or a list."""
    if not isinstance(value, (dict, list)):
        raise _FieldError("locality", f"must be an object or a list (got {_type_name(value)})")
    groups = value.items() if isinstance(value, dict) else enumerate(value)
    out: list[LocalityProbe] = []
    for name, group in groups:
        items = group if isinstance(group, list) else [group]
        for i, item in enumerate(items):
            where = f"locality.{name}" + (f"[{i}]" if isinstance(group, list) else "")
            if not isinstance(item, dict):
                got = _type_name(item)
                raise _FieldError(where, f"must be an object with 'prompt' and 'ground_truth' (got {got})")
            prompt, answer = item.get("prompt"), item.get("ground_truth", item.get("answer"))
            out.extend(_probes(prompt, answer, f"{where}.prompt", f"{where}.ground_truth"))
    return tuple(out)


def _from_zsre(r: dict[str, Any]) -> EditRequest:
    # ZsRE's gold answer is answers[0]; ``pred`` is the MEND-era BART model's output (cond = "pred >> alt").
    answers = _texts(r.get("answers"), "answers")
    return EditRequest(
        prompt=_text(r, "src", required=True),
        target_new=_text(r, "alt", required=True, strip=True),
        subject=_text(r, "subject"),
        target_true=answers[0].strip() if answers else _text(r, "pred", strip=True),
        rephrase_prompts=_texts(r.get("rephrase"), "rephrase"),
        locality_prompts=_probes(r.get("loc"), r.get("loc_ans"), "loc", "loc_ans"),
    )


def _from_easyedit(r: dict[str, Any]) -> EditRequest:
    """CounterFact and WikiBigEdit share EasyEdit's field names; only CounterFact has ground_truth."""
    truth = r.get("ground_truth")
    if isinstance(truth, list):  # some variants list aliases
        truth = _texts(truth, "ground_truth")[0] if truth else None
        r = {**r, "ground_truth": truth}
    probes = _probes(
        r.get("locality_prompt"), r.get("locality_ground_truth"), "locality_prompt", "locality_ground_truth"
    )
    if r.get("locality") is not None:
        probes += _nested_locality(r["locality"])
    return EditRequest(
        prompt=_text(r, "prompt", required=True),
        target_new=_text(r, "target_new", required=True, strip=True),
        subject=_text(r, "subject"),
        target_true=_text(r, "ground_truth", strip=True),
        rephrase_prompts=_texts(r.get("rephrase_prompt"), "rephrase_prompt"),
        locality_prompts=probes,
    )


def _from_canonical(r: dict[str, Any]) -> EditRequest:
    raw_probes = r.get("locality_prompts")
    if raw_probes is not None and not isinstance(raw_probes, list):
        raise _FieldError("locality_prompts", f"must be a list of objects (got {_type_name(raw_probes)})")
    probes = []
    for i, probe in enumerate(raw_probes or []):
        where = f"locality_prompts[{i}]"
        if not isinstance(probe, dict):
            got = _type_name(probe)
            raise _FieldError(where, f"must be an object with 'prompt' and 'answer' (got {got})")
        try:
            prompt = _text(probe, "prompt", required=True)
            answer = _text(probe, "answer", required=True, strip=True)
        except _FieldError as err:
            raise _FieldError(f"{where}.{err.args[0]}", err.args[1]) from None
        probes.append(LocalityProbe(prompt, answer))
    return EditRequest(
        prompt=_text(r, "prompt", required=True),
        target_new=_text(r, "target_new", required=True, strip=True),
        subject=_text(r, "subject"),
        target_true=_text(r, "target_true", strip=True),
        rephrase_prompts=_texts(r.get("rephrase_prompts"), "rephrase_prompts", allow_str=False),
        locality_prompts=tuple(probes),
    )


_MAPPERS: dict[str, Callable[[dict[str, Any]], EditRequest]] = {
    "zsre": _from_zsre,
    "counterfact": _from_easyedit,
    "wikibigedit": _from_easyedit,
    "jsonl": _from_canonical,
}


def _build(fmt: str, record: dict[str, Any], path: str, num: int) -> EditRequest:
    try:
        return _MAPPERS[fmt](record)
    except _FieldError as err:
        guess = _guess_format(record)
        hint = f" (reading as {fmt}, but this record looks like {guess})" if guess not in (fmt, None) else ""
        field, problem = err.args
        raise EditDataError(f"{path}: record {num}: field '{field}': {problem}{hint}") from None


SKIP_HINT = (
    "to skip invalid records and count them: edits.skip_invalid=true (locft edit) or --skip-invalid "
    "(locft convert, locft eval)"
)


def load_edits(
    path: str | Path,
    format: str = "auto",
    *,
    skip_invalid: bool = False,
    limit: int | None = None,
    warn: bool = True,
) -> EditSet:
    """Load an edit file; ``limit`` keeps the first N valid edits and stops reading there.

    The same prompt with two different targets is an error (no model can learn both); an exact repeat
    is dropped and counted. ``skip_invalid`` skips bad records instead of raising, but a missing, empty,
    unreadable or undetectable file, or one with no valid edit at all, still raises. ``warn=False`` logs
    the skipped records at INFO (a file read for something other than its edits, e.g. relation wordings).
    """
    where = str(path)
    if format != "auto" and format not in FORMATS:
        raise EditDataError(f"{where}: unknown format {format!r}; choose auto or one of {', '.join(FORMATS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise EditDataError(f"{where}: limit must be a positive integer or None (got {limit!r})")
    fmt = None if format == "auto" else format
    requests: list[EditRequest] = []
    seen: dict[str, tuple[int, str]] = {}  # prompt -> (record number, target_new)
    reasons: list[str] = []
    num_skipped = num_duplicates = 0
    for num, record in _records(Path(path)):
        if fmt is None and isinstance(record, dict):
            fmt = _detect(record, where, num)  # file-level: raises even with skip_invalid
        try:
            if isinstance(record, EditDataError):
                raise record
            request = _build(fmt, record, where, num)
            if request.prompt in seen:
                first_num, first_target = seen[request.prompt]
                if first_target == request.target_new:
                    num_duplicates += 1
                    continue
                field = "alt" if fmt == "zsre" else "target_new"
                raise EditDataError(
                    f"{where}: record {num}: field '{field}': prompt {request.prompt!r} already appears in "
                    f"record {first_num} with target {first_target!r}, here {request.target_new!r}; "
                    "one prompt can be edited to only one target"
                )
        except EditDataError as err:
            if not skip_invalid:
                raise EditDataError(f"{err}; {SKIP_HINT}") from None
            num_skipped += 1
            if len(reasons) < _MAX_REASONS:
                reasons.append(str(err))
            continue
        seen[request.prompt] = (num, request.target_new)
        requests.append(request)
        if limit is not None and len(requests) >= limit:
            break
    first = f"; first problems: {' | '.join(reasons)}" if reasons else ""
    if not requests:
        raise EditDataError(f"{where}: no valid edits ({num_skipped} invalid records skipped{first})")
    if num_skipped or num_duplicates:
        summary = f"skipped {num_skipped} invalid records, dropped {num_duplicates} exact duplicates"
        level = logging.WARNING if warn else logging.INFO
        logger.log(level, "%s: loaded %d edits, %s%s", where, len(requests), summary, first)
    return EditSet(requests, where, fmt, num_skipped, num_duplicates)


def write_jsonl(requests: Iterable[EditRequest], path: str | Path) -> int:
    """Write canonical JSONL atomically (temp file + os.replace), so a crash never leaves half a file.

    Each record is checked to read back, so the output is always loadable. Returns the number written.
    """
    path = Path(path)
    mode = path.stat().st_mode & 0o777 if path.is_file() else None  # a rewritten file keeps its mode
    with outputs.atomic_path(path, mode=mode) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        num = 0
        for num, request in enumerate(requests, start=1):
            record = request.to_json()
            _build("jsonl", record, str(path), num)
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return num


def convert(
    in_path: str | Path,
    out_path: str | Path,
    format: str = "auto",
    *,
    skip_invalid: bool = False,
    limit: int | None = None,
) -> EditSet:
    """Load ``in_path`` in any supported format and write it as canonical JSONL; returns what was loaded."""
    outputs.check_writable(out_path, "output")  # before reading a large input
    edit_set = load_edits(in_path, format, skip_invalid=skip_invalid, limit=limit)
    write_jsonl(edit_set.requests, out_path)
    return edit_set
