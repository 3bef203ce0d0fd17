"""Edit-file loaders: the real dataset files, every bad-input message, skipping, limits, atomic writes."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from locft_dist.edits import (
    EditRequest,
    LocalityProbe,
    convert,
    detect_format,
    edits_fingerprint,
    formats,
    load_edits,
    write_jsonl,
)
from locft_dist.edits.formats import iter_records
from locft_dist.errors import EditDataError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # <repo>/../shared/data
needs_data = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"dataset dir {DATA} missing (shared/ not beside repo)"
)

CF = {"case_id": 0, "prompt": "P0 is in", "target_new": "Asia", "subject": "P0", "ground_truth": "Europe"}


def canon(i: int, **extra) -> dict:
    return {"prompt": f"prompt {i}", "target_new": f"target {i}", **extra}


def write_records(path: Path, records: list) -> Path:
    """JSONL, one entry per line; str entries are written verbatim (for broken lines)."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def load_error(path: Path, **kwargs) -> str:
    with pytest.raises(EditDataError) as info:
        load_edits(path, **kwargs)
    return str(info.value)


@needs_data
def test_zsre_file_maps_fields():
    edits = load_edits(DATA / "zsre_3k.json")
    assert (len(edits), edits.format, edits.num_skipped, edits.num_duplicates) == (3000, "zsre", 0, 0)
    first = edits.requests[0]
    assert first.prompt == "Which river system contains Charity Creek?"
    assert (first.target_new, first.target_true, first.subject) == (
        "Chichester River",
        "Parramatta River",
        "Charity Creek",
    )
    assert first.rephrase_prompts == ("What river system is Charity Creek in?",)
    assert first.locality_prompts == (
        LocalityProbe("nq question: how many series of diary of a wimpy kid are there", "12"),
    )
    # record 20 has alt " 625": targets lose the stray space, the encoder adds its own
    assert edits.requests[19].target_new == "625"
    # target_true is the gold answer (answers[0]), not the MEND-era BART model's prediction (pred)
    raw = json.loads((DATA / "zsre_3k.json").read_text(encoding="utf-8"))
    assert [r.target_true for r in edits.requests] == [x["answers"][0].strip() for x in raw]


@needs_data
def test_counterfact_file_has_conflicting_prompts():
    message = load_error(DATA / "counterfact_3k.json")
    assert "counterfact_3k.json: record 564: field 'target_new'" in message
    assert "record 463" in message and "Frank Lampard" in message
    edits = load_edits(DATA / "counterfact_3k.json", skip_invalid=True)
    assert (len(edits), edits.format, edits.num_skipped, edits.num_duplicates) == (2993, "counterfact", 7, 0)
    first = edits.requests[0]
    assert (first.prompt, first.target_new, first.target_true) == (
        "Reedy Glacier is in",
        "Asia",
        "Antarctica",
    )
    assert first.subject == "Reedy Glacier"
    assert first.rephrase_prompts[0].endswith("Reedy Glacier is located in the continent")
    assert first.locality_prompts == (LocalityProbe("Mount Erebus, in", "Antarctica"),)


@needs_data
def test_wikibigedit_file_maps_fields():
    edits = load_edits(DATA / "wikibigedit_3k.json")
    assert (len(edits), edits.format, edits.num_skipped) == (3000, "wikibigedit", 0)
    first = edits.requests[0]
    assert first.target_new == "Roxburghshire" and first.target_true is None
    assert first.subject == "Crailing Parish Church" and first.prompt.endswith("Parish Church located?")
    assert first.locality_prompts == (
        LocalityProbe("In which historic county is Carriden Parish Church located?", "West Lothian"),
    )


@needs_data
def test_counterfact_full_jsonl_counts_and_speed():
    path = DATA / "counterfact_full.jsonl"
    numbers = [num for num, _ in iter_records(path)]
    assert len(numbers) == 21_919 and numbers[-1] == 21_919
    start = time.perf_counter()
    edits = load_edits(path, skip_invalid=True)
    assert time.perf_counter() - start < 2.0
    assert len(edits) + edits.num_skipped + edits.num_duplicates == 21_919
    assert (len(edits), edits.num_skipped, edits.num_duplicates) == (21_595, 314, 10)
    assert edits.requests[0].prompt == "The mother tongue of Danielle Darrieux is"
    message = load_error(path)
    assert "record 913" in message and "record 252" in message


@needs_data
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("zsre_3k.json", "zsre"),
        ("counterfact_3k.json", "counterfact"),
        ("wikibigedit_3k.json", "wikibigedit"),
        ("counterfact_full.jsonl", "counterfact"),
    ],
)
def test_detect_format_on_real_files(name, expected):
    assert detect_format(DATA / name) == expected


@needs_data
@pytest.mark.parametrize("name", ["zsre_3k.json", "counterfact_3k.json", "wikibigedit_3k.json"])
def test_convert_round_trip(tmp_path, name):
    out = tmp_path / "edits.jsonl"
    loaded = convert(DATA / name, out, skip_invalid=True)
    assert detect_format(out) == "jsonl"
    again = load_edits(out)
    assert again.requests == loaded.requests and again.format == "jsonl"
    assert edits_fingerprint(again.requests) == edits_fingerprint(loaded.requests)
    assert len(out.read_text(encoding="utf-8").splitlines()) == len(loaded)


def test_detect_each_format(tmp_path):
    zsre = {"src": "q?", "alt": "a", "pred": "b", "answers": ["b"], "loc": "nq question: x", "loc_ans": "y"}
    wbe = {"prompt": "p", "target_new": "t", "rephrase_prompt": "r", "locality_prompt": "l"}
    cases = {"zsre": zsre, "counterfact": CF, "wikibigedit": wbe, "jsonl": canon(0)}
    for fmt, record in cases.items():
        assert detect_format(write_records(tmp_path / f"{fmt}.jsonl", [record])) == fmt
    unknown = write_records(tmp_path / "unknown.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(EditDataError) as info:
        detect_format(unknown)
    message = str(info.value)
    assert "unknown.jsonl: record 1" in message and "answer, question" in message
    assert "cannot detect" in load_error(unknown, skip_invalid=True)


def test_canonical_as_json_array_with_bom(tmp_path):
    path = tmp_path / "edits.json"
    path.write_bytes(b"\xef\xbb\xbf  " + json.dumps([canon(0), canon(1, subject="s")]).encode())
    edits = load_edits(path)
    assert edits.format == "jsonl" and edits.requests[1] == EditRequest("prompt 1", "target 1", subject="s")


def test_easyedit_variants_lists_and_nested_locality(tmp_path):
    record = {
        **CF,
        "ground_truth": ["Europe", "EU"],
        "rephrase_prompt": ["R1", "R2"],
        "locality_prompt": ["L1", "L2"],
        "locality_ground_truth": ["A1", " A2 "],
        "locality": {
            "Relation_Specificity": [{"prompt": "N1", "ground_truth": ["B1", "B1 alias"]}],
            "neighborhood": {"prompt": ["N2", "N3"], "ground_truth": ["C2", "C3"]},
        },
    }
    request = load_edits(write_records(tmp_path / "cf.jsonl", [record])).requests[0]
    assert request.target_true == "Europe" and request.rephrase_prompts == ("R1", "R2")
    assert [(p.prompt, p.answer) for p in request.locality_prompts] == [
        ("L1", "A1"),
        ("L2", "A2"),
        ("N1", "B1"),
        ("N2", "C2"),
        ("N3", "C3"),
    ]


def test_optional_probe_fields_may_be_absent_or_empty(tmp_path):
    records = [
        {"prompt": "a", "target_new": "x", "rephrase_prompt": "", "locality_prompt": None, "subject": ""},
        {"prompt": "b", "target_new": "y", "rephrase_prompt": []},
    ]
    edits = load_edits(write_records(tmp_path / "wbe.jsonl", records))
    assert edits.requests == [EditRequest("a", "x"), EditRequest("b", "y")]


def test_message_names_file_record_and_field(tmp_path):
    records = [canon(i) for i in range(16)] + [canon(16, target_new=7)]
    message = load_error(write_records(tmp_path / "edits.jsonl", records))
    assert message.endswith(
        "edits.jsonl: record 17: field 'target_new': must be a non-empty string (got int); to skip invalid "
        "records and count them: edits.skip_invalid=true (locft edit) or --skip-invalid (locft convert, "
        "locft eval)"
    )


def test_missing_and_empty_files(tmp_path):
    assert "missing.jsonl: no such file" in load_error(tmp_path / "missing.jsonl", skip_invalid=True)
    assert "is a directory" in load_error(tmp_path)
    for name, content in [("empty.jsonl", b""), ("blank.jsonl", b" \n\n\t\n"), ("empty.json", b"[]")]:
        (tmp_path / name).write_bytes(content)
        message = load_error(tmp_path / name, skip_invalid=True)
        assert f"{name}: no records" in message


@pytest.mark.parametrize(
    ("record", "field", "problem"),
    [
        ({"target_new": "t", "rephrase_prompt": "r"}, "prompt", "missing (required)"),
        (canon(1, prompt="   "), "prompt", "whitespace-only"),
        (canon(1, target_new=""), "target_new", "non-empty string"),
        (canon(1, prompt=None), "prompt", "got null"),
        (canon(1, prompt=["p"]), "prompt", "got list"),
        (canon(1, rephrase_prompts=["ok", 3]), "rephrase_prompts[1]", "got int"),
        (canon(1, rephrase_prompts="a string"), "rephrase_prompts", "list of strings"),
        (
            canon(1, locality_prompts=[{"prompt": "p", "answer": "a"}, {"prompt": "q"}]),
            "locality_prompts[1].answer",
            "missing",
        ),
        (canon(1, locality_prompts=["p"]), "locality_prompts[0]", "must be an object"),
        ({**CF, "rephrase_prompt": ["r", None]}, "rephrase_prompt[1]", "got null"),
        ({**CF, "locality_prompt": "l"}, "locality_ground_truth", "required with 'locality_prompt'"),
        (
            {**CF, "locality_prompt": ["a", "b"], "locality_ground_truth": ["x"]},
            "locality_ground_truth",
            "expected 2",
        ),
        ({"src": 5, "alt": "a"}, "src", "got int"),
        ({"src": "q", "alt": "a", "loc": "nq question: x"}, "loc_ans", "missing"),
    ],
)
def test_invalid_field(tmp_path, record, field, problem):
    path = write_records(tmp_path / "edits.jsonl", ["", record])  # JSONL record numbers are line numbers
    message = load_error(path)
    assert f"edits.jsonl: record 2: field '{field}': " in message and problem in message


def test_broken_json_line(tmp_path):
    path = write_records(tmp_path / "edits.jsonl", [canon(0), "", '{"prompt": "p", "target_new": "t",'])
    message = load_error(path)
    assert "edits.jsonl: record 3: invalid JSON at line 3, column" in message and "Expecting" in message
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps(canon(0), indent=2))
    assert "one object per line, or be an array" in load_error(pretty)
    broken_array = tmp_path / "broken.json"
    broken_array.write_text('[\n{"prompt": "p", "target_new": "t"},\n{"prompt": }\n]')
    assert "broken.json: invalid JSON at line 3, column 12" in load_error(broken_array)


def test_non_utf8_bytes(tmp_path):
    good = json.dumps(canon(0)).encode() + b"\n"
    path = tmp_path / "edits.jsonl"
    path.write_bytes(good + b'{"prompt": "caf\xe9", "target_new": "t"}\n')
    message = load_error(path)
    assert f"edits.jsonl: record 2: not valid UTF-8 at byte {len(good) + 15} (line 2, column 16)" in message
    array = tmp_path / "edits.json"
    array.write_bytes(b'[\n{"prompt": "caf\xe9", "target_new": "t"}]')
    assert "edits.json: not valid UTF-8 at byte 17 (line 2)" in load_error(array, skip_invalid=True)
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_bytes(json.dumps(canon(0)).encode("utf-16"))
    assert "UTF-16" in load_error(utf16, skip_invalid=True)


def test_record_that_is_not_an_object(tmp_path):
    assert "edits.jsonl: record 2: expected a JSON object, got list" in load_error(
        write_records(tmp_path / "edits.jsonl", [canon(0), [1, 2]])
    )
    array = tmp_path / "edits.json"
    array.write_text(json.dumps([canon(0), "just text"]))
    assert "edits.json: record 2: expected a JSON object, got str" in load_error(array)


def test_conflicting_and_exact_duplicates(tmp_path):
    records = [canon(0), canon(1), canon(0), canon(2), canon(1, target_new="other")]
    message = load_error(write_records(tmp_path / "edits.jsonl", records))
    assert "edits.jsonl: record 5: field 'target_new'" in message and "record 2" in message
    zsre = [{"src": "q", "alt": "a"}, {"src": "q", "alt": " a "}, {"src": "q", "alt": "b"}]
    message = load_error(write_records(tmp_path / "zsre.jsonl", zsre))
    assert "record 3: field 'alt'" in message and "record 1" in message
    edits = load_edits(write_records(tmp_path / "dups.jsonl", records[:4]))
    assert (len(edits), edits.num_duplicates, edits.num_skipped) == (3, 1, 0)


def test_explicit_format_mismatch_and_unknown_format(tmp_path):
    path = write_records(tmp_path / "cf.jsonl", [CF])
    message = load_error(path, format="zsre")
    assert "record 1: field 'src': missing" in message and "looks like counterfact" in message
    assert "unknown format 'csv'" in load_error(path, format="csv")
    assert load_edits(path, format="wikibigedit").requests[0].target_true == "Europe"


def test_skip_invalid_counts_and_warns_once(tmp_path, caplog):
    records = [canon(0), canon(1, target_new=3), "{broken", [1], canon(0), canon(0, target_new="x"), canon(2)]
    path = write_records(tmp_path / "edits.jsonl", records)
    with caplog.at_level(logging.WARNING, logger="locft_dist.edits.formats"):
        edits = load_edits(path, skip_invalid=True)
    assert [r.prompt for r in edits.requests] == ["prompt 0", "prompt 2"]
    assert (edits.num_skipped, edits.num_duplicates) == (4, 1)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert (
        "skipped 4 invalid records" in text and "record 2: field 'target_new'" in text and "record 3" in text
    )


def test_skip_invalid_with_no_valid_record_raises(tmp_path):
    path = write_records(tmp_path / "edits.jsonl", [canon(0, prompt=""), "{oops"])
    message = load_error(path, skip_invalid=True)
    assert "edits.jsonl: no valid edits (2 invalid records skipped" in message and "record 1" in message


def test_limit_keeps_first_valid_edits(tmp_path):
    records = [canon(0), canon(1, prompt=""), canon(0), canon(2), canon(3), "{never read"]
    path = write_records(tmp_path / "edits.jsonl", records)
    edits = load_edits(path, skip_invalid=True, limit=3)
    assert [r.prompt for r in edits.requests] == ["prompt 0", "prompt 2", "prompt 3"]
    assert (edits.num_skipped, edits.num_duplicates) == (1, 1)
    assert len(load_edits(path, limit=1)) == 1  # stops reading before the bad lines
    assert "limit must be a positive integer" in load_error(path, limit=0)


def test_iter_records_numbers_lines_and_raises_on_bad_record(tmp_path):
    path = write_records(tmp_path / "edits.jsonl", [canon(0), "", canon(1), "nope"])
    records = iter_records(path)
    assert [num for num, _ in [next(records), next(records)]] == [1, 3]
    with pytest.raises(EditDataError, match="record 4: invalid JSON"):
        next(records)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_write_jsonl_is_canonical(tmp_path):
    requests = [EditRequest("p", "t", subject="s", locality_prompts=(LocalityProbe("l", "a"),))]
    out = tmp_path / "new" / "dir" / "edits.jsonl"
    assert write_jsonl(iter(requests), out) == 1
    assert json.loads(out.read_text()) == requests[0].to_json()
    assert oct(out.stat().st_mode & 0o777) == oct(0o644) and leftovers(out.parent) == []
    assert write_jsonl([], tmp_path / "none.jsonl") == 0


def test_write_jsonl_failure_keeps_existing_output(tmp_path, monkeypatch):
    out = tmp_path / "edits.jsonl"
    out.write_text("previous content\n")

    def failing():
        yield EditRequest("p1", "t1")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_jsonl(failing(), out)
    with pytest.raises(EditDataError, match=r"edits.jsonl: record 2: field 'target_new'.*got object"):
        write_jsonl([EditRequest("p1", "t1"), EditRequest("p2", object())], out)  # type: ignore[arg-type]
    monkeypatch.setattr(formats.os, "replace", lambda *_: (_ for _ in ()).throw(OSError("no space")))
    with pytest.raises(OSError, match="no space"):
        write_jsonl([EditRequest("p1", "t1")], out)
    assert out.read_text() == "previous content\n" and leftovers(tmp_path) == []


request_text = st.text(min_size=1, max_size=20).filter(lambda s: s.strip())
target_text = request_text.map(str.strip)
requests_strategy = st.lists(
    st.builds(
        EditRequest,
        prompt=request_text,
        target_new=target_text,
        subject=st.none() | request_text,
        target_true=st.none() | target_text,
        rephrase_prompts=st.lists(request_text, max_size=2).map(tuple),
        locality_prompts=st.lists(st.builds(LocalityProbe, request_text, target_text), max_size=2).map(tuple),
    ),
    min_size=1,
    max_size=5,
    unique_by=lambda r: r.prompt,
)


@settings(max_examples=40, deadline=None)
@given(requests=requests_strategy)
def test_write_then_load_round_trips(tmp_path_factory, requests):
    out = tmp_path_factory.mktemp("rt") / "edits.jsonl"
    assert write_jsonl(requests, out) == len(requests)
    assert load_edits(out, "jsonl").requests == requests
    assert os.listdir(out.parent) == ["edits.jsonl"]
