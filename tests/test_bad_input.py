"""Bad input: property tests over the edit loaders and the config parser, and the named hard cases.

The properties: whatever the bytes of an edit file or the keys and values of a config, the only exceptions
are our ``LocftError`` types (with the file named), and a failed ``convert`` leaves no output file. Cases
covered elsewhere are listed in docs/reliability.md with their tests (duplicates: test_formats; 100K
edits: test_scale; a wrong location: test_cli/test_locate; a delta for another base: test_delta).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from locft_dist.config import RunConfig, all_keys, load_config
from locft_dist.edits import EditRequest, convert, load_edits, write_jsonl
from locft_dist.errors import ConfigError, EditDataError, EncodingError, LocateError, LocftError

FIELDS = [
    "prompt", "target_new", "subject", "target_true", "rephrase_prompts", "locality_prompts", "src", "alt",
    "answers", "rephrase", "loc", "loc_ans", "ground_truth", "rephrase_prompt", "locality_prompt",
    "locality_ground_truth", "locality", "answer", "case_id",
]  # fmt: skip
# Text with what breaks naive code: RTL scripts and marks, combining characters, NUL, blank strings.
SPECIAL = st.sampled_from(["שלום", "مرحبا", "\u200f", "\u202e", "\u0301", "\x00", " ", ""])
TEXT = st.lists(st.text(st.characters(codec="utf-8"), max_size=10) | SPECIAL, max_size=3).map("".join)
JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(FIELDS) | TEXT, inner, max_size=4)
    ),
    max_leaves=12,
)
RECORD = st.dictionaries(st.sampled_from(FIELDS), JSON_VALUE | TEXT, max_size=6)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _file_bytes(kind: str, records: list, raw: bytes) -> bytes:
    if kind == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    if kind == "array":
        return json.dumps(records, ensure_ascii=False).encode("utf-8")
    if kind == "spliced":  # valid lines with random bytes in between
        lines = [json.dumps(r).encode() for r in records]
        return b"\n".join([*lines[:1], raw, *lines[1:]])
    return raw


@FUZZ
@given(
    kind=st.sampled_from(["jsonl", "array", "spliced", "bytes"]),
    records=st.lists(RECORD | JSON_VALUE, max_size=5),
    raw=st.binary(max_size=60),
    fmt=st.sampled_from(["auto", "zsre", "counterfact", "wikibigedit", "jsonl"]),
    skip_invalid=st.booleans(),
)
def test_any_edit_file_loads_or_raises_a_clear_error_with_no_partial_output(
    tmp_path_factory, kind, records, raw, fmt, skip_invalid
):
    tmp = tmp_path_factory.mktemp("fuzz")
    source, out = tmp / "in.jsonl", tmp / "out.jsonl"
    source.write_bytes(_file_bytes(kind, records, raw))
    try:
        loaded = convert(source, out, fmt, skip_invalid=skip_invalid)
    except EditDataError as err:
        assert str(source) in str(err), f"the message must name the file: {err}"
        assert sorted(os.listdir(tmp)) == ["in.jsonl"], "a failed convert left output behind"
        return
    assert loaded.requests, "success means at least one edit"
    for request in loaded.requests:
        assert request.prompt.strip() and request.target_new.strip()
    assert load_edits(out, "jsonl").requests == loaded.requests
    assert sorted(os.listdir(tmp)) == ["in.jsonl", "out.jsonl"]


KEYS = list(all_keys())
KEY = st.sampled_from(KEYS) | st.text(string.ascii_lowercase + "._", min_size=1, max_size=20)
VALUE = (
    st.none()
    | st.booleans()
    | st.integers(-5, 10**6)
    | st.floats(allow_nan=True)
    | TEXT
    | st.lists(st.integers(-40, 40) | TEXT, max_size=3)
)


@FUZZ
@given(values=st.dictionaries(KEY, VALUE, max_size=5), raw=st.text(max_size=40))
def test_any_config_parses_or_raises_a_config_error(tmp_path_factory, values, raw):
    tree: dict = {}
    for key, value in values.items():
        node = tree
        *sections, leaf = key.split(".")
        if any(not part for part in key.split(".")):
            continue
        try:
            for part in sections:
                node = node.setdefault(part, {})
            node[leaf] = value
        except (AttributeError, TypeError):
            continue  # "a" and "a.b" both given: not a tree
    path = tmp_path_factory.mktemp("cfg") / "run.yaml"
    path.write_text(yaml.safe_dump(tree, allow_unicode=True), encoding="utf-8")
    for source, overrides in ((path, []), (None, [f"{k}={json.dumps(v)}" for k, v in values.items()])):
        with contextlib.suppress(ConfigError, LocateError):  # LocateError: an unknown locate.preset
            assert isinstance(load_config(source, overrides), RunConfig)
    raw_file = path.with_name("raw.yaml")
    raw_file.write_text(raw, encoding="utf-8")
    try:
        load_config(raw_file)
    except ConfigError as err:
        assert "raw.yaml" in str(err)


@settings(max_examples=40, deadline=None)
@given(key=st.sampled_from([k for k in KEYS if len(k.split(".")[1]) >= 5]), data=st.data())
def test_a_key_typo_suggests_the_right_key(key, data):
    section, leaf = key.split(".")
    at = data.draw(st.integers(0, len(leaf) - 2))
    typo = data.draw(
        st.sampled_from(
            [
                leaf[:at] + leaf[at + 1 :],  # a dropped letter
                leaf[:at] + leaf[at + 1] + leaf[at] + leaf[at + 2 :],  # swapped neighbours
                leaf[:at] + leaf[at] + leaf[at:],  # a doubled letter
            ]
        )
    )
    if f"{section}.{typo}" in KEYS:
        return
    with pytest.raises(ConfigError, match=rf"did you mean '{key}'"):
        load_config(None, [f"{section}.{typo}=1"])


def _edit_job(model_dir, edits, tmp_path, *extra: str) -> list[str]:
    return [
        "edit",
        f"model.path={model_dir}",
        f"edits.path={edits}",
        "locate.layers=[1]",
        "train.epochs=2",
        "train.batch_size=2",
        "train.progress=false",
        "eval.generation=false",
        f"output.dir={tmp_path / 'run'}",
        *extra,
    ]


def test_one_edit_with_rtl_unicode_and_a_very_long_prompt_runs_end_to_end(tiny_model_dir, tmp_path):
    from locft_dist.cli import main

    long_prompt = "Vorin Talbeck lives in the city of " * 400 + "\u202eשלום عالم Kesso Varn works as a"
    edits = tmp_path / "edits.jsonl"
    write_jsonl([EditRequest(long_prompt, "glassblower \u200fمرحبا")], edits)
    assert main(_edit_job(tiny_model_dir, edits, tmp_path, "edits.max_length=64")) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train"]["num_steps"] == 2
    assert (tmp_path / "run" / "delta.safetensors").is_file()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "no records (empty file)"),
        ("\n\n", "no records"),
        ("[]", "no records (empty JSON array)"),
    ],
)
def test_empty_edit_files_fail_before_the_run_directory_exists(tiny_model_dir, tmp_path, content, message):
    from locft_dist.edit_job import run_edit

    edits = tmp_path / "edits.jsonl"
    edits.write_text(content)
    with pytest.raises(EditDataError, match=re.escape(message)):
        run_edit(load_config(None, _edit_job(tiny_model_dir, edits, tmp_path)[1:]))
    assert not (tmp_path / "run").exists()


def test_a_target_that_tokenizes_to_nothing_names_the_edit(tmp_path):
    """A real tokenizer whose normalizer drops format characters (RTL marks, zero-width spaces)."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from locft_dist.edit_job import encode_edits

    vocab = {"<unk>": 0, "<eos>": 1, "Paris": 2, "is": 3, "in": 4, "France": 5, "Rome": 6}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Replace(Regex(r"\p{Cf}"), "")
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>")
    requests = [EditRequest("Paris is in", "France"), EditRequest("Rome is in", "\u200f\u200b")]
    cfg = load_config(
        None, [f"edits.path={tmp_path}/e.jsonl", "edits.append_eos=false", "edits.target_prefix="]
    )
    with pytest.raises(EncodingError, match=r"e\.jsonl: edit 2: target .* tokenizes to nothing"):
        encode_edits(tokenizer, requests, cfg)
    assert isinstance(EncodingError("x"), LocftError)
