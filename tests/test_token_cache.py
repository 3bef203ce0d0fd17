"""The on-disk token cache: same examples as direct encoding, reused, invalidated, rebuilt, atomic."""

import logging
import os

import pytest

from locft_dist.edits import EditRequest, write_jsonl
from locft_dist.edits.encode import Encoding, encode_pairs
from locft_dist.edits.token_cache import TokenTable, read_cache, tokenized_edits, write_cache
from locft_dist.errors import EncodingError

SETTINGS = Encoding(target_prefix=" ", append_eos=True, max_length=64)


def _requests(n: int, answer: str = "Ostrava") -> list[EditRequest]:
    return [
        EditRequest(prompt=f"Vorin Talbeck {i} lives in the city of", target_new=answer) for i in range(n)
    ]


def _load(path, tokenizer, cache_dir, **kwargs):
    kwargs.setdefault("need_requests", False)
    kwargs.setdefault("encoding", SETTINGS)
    return tokenized_edits(str(path), tokenizer, cache_dir=cache_dir, **kwargs)


def test_cache_matches_direct_encoding_and_is_reused(tiny_tokenizer, tmp_path, monkeypatch):
    edits = tmp_path / "edits.jsonl"
    requests = _requests(20)
    write_jsonl(requests, edits)
    first = _load(edits, tiny_tokenizer, tmp_path / "cache")
    expected = encode_pairs(
        tiny_tokenizer, [r.prompt for r in requests], [r.target_new for r in requests], SETTINGS
    )
    assert not first.from_cache and first.requests is None and first.cache_path.is_file()
    assert list(first.examples) == expected
    assert first.examples.lengths() == [len(e.input_ids) for e in expected]

    import locft_dist.edits.token_cache as module

    def no_parsing(*args, **kwargs):
        raise AssertionError("a cache hit must not parse the edit file")

    monkeypatch.setattr(module, "load_edits", no_parsing)
    second = _load(edits, tiny_tokenizer, tmp_path / "cache")
    assert second.from_cache and second.cache_path == first.cache_path
    assert list(second.examples) == expected and second.examples[-1] == expected[-1]
    assert (second.fingerprint, second.format) == (first.fingerprint, first.format)
    monkeypatch.undo()
    third = _load(edits, tiny_tokenizer, tmp_path / "cache", need_requests=True)
    assert third.from_cache and list(third.requests) == requests  # mapped records, parsed on access


def test_changed_file_settings_or_tokenizer_miss_the_cache(tiny_tokenizer, tmp_path):
    from locft_dist.demo.tokenizer import train_tokenizer
    from tests.conftest import SENTENCES

    edits = tmp_path / "edits.jsonl"
    write_jsonl(_requests(5), edits)
    cache = tmp_path / "cache"
    base = _load(edits, tiny_tokenizer, cache)
    write_jsonl(_requests(5, answer="Baltholm"), edits)
    changed = _load(edits, tiny_tokenizer, cache)
    assert not changed.from_cache and changed.cache_path != base.cache_path
    assert changed.examples[0] != base.examples[0]
    limited = _load(edits, tiny_tokenizer, cache, limit=3)
    assert not limited.from_cache and len(limited.examples) == 3
    other = train_tokenizer(SENTENCES * 4, None, vocab_size=300)
    retokenized = _load(edits, other, cache)
    assert not retokenized.from_cache and retokenized.cache_path != changed.cache_path
    assert len(list(cache.glob("*.tok"))) == 4


def test_every_encoding_field_the_encoder_version_and_chat_template_key_the_cache(
    tiny_tokenizer, tmp_path, monkeypatch
):
    import dataclasses

    import locft_dist.edits.encode as encode_module
    from tests.tokenizer_families import CHATML_TEMPLATE, with_chat_template

    edits = tmp_path / "edits.jsonl"
    write_jsonl(_requests(3), edits)
    cache = tmp_path / "cache"
    paths = {_load(edits, tiny_tokenizer, cache).cache_path}
    changes = {"target_prefix": "", "append_eos": False, "chat_template": "auto", "max_length": 32}
    assert set(changes) == {f.name for f in dataclasses.fields(Encoding)}, "a new Encoding field: add it here"
    chat_tokenizer = with_chat_template(tiny_tokenizer, CHATML_TEMPLATE)
    for name, value in changes.items():
        tok = chat_tokenizer if name == "chat_template" else tiny_tokenizer
        loaded = _load(edits, tok, cache, encoding=dataclasses.replace(SETTINGS, **{name: value}))
        assert not loaded.from_cache, name
        paths.add(loaded.cache_path)
    # the same encoding, another chat template on the tokenizer: other prompts in chat mode
    chat = dataclasses.replace(SETTINGS, chat_template="auto")
    other_template = with_chat_template(tiny_tokenizer, "{{ 'Be brief. ' }}" + CHATML_TEMPLATE)
    paths.add(_load(edits, other_template, cache, encoding=chat).cache_path)
    monkeypatch.setattr(encode_module, "ENCODER_VERSION", encode_module.ENCODER_VERSION + 1)
    bumped = _load(edits, tiny_tokenizer, cache)
    assert not bumped.from_cache
    paths.add(bumped.cache_path)
    assert len(paths) == 7


def test_corrupt_cache_is_rebuilt_with_a_warning(tiny_tokenizer, tmp_path, caplog):
    edits = tmp_path / "edits.jsonl"
    write_jsonl(_requests(8), edits)
    first = _load(edits, tiny_tokenizer, tmp_path / "cache")
    expected = list(first.examples)
    data = bytearray(first.cache_path.read_bytes())
    data[-3] ^= 0xFF  # one flipped id byte
    first.cache_path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        rebuilt = _load(edits, tiny_tokenizer, tmp_path / "cache")
    assert not rebuilt.from_cache and "checksum" in caplog.text and list(rebuilt.examples) == expected
    first.cache_path.write_bytes(b"LOCFTTOK\x05")  # truncated
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert not _load(edits, tiny_tokenizer, tmp_path / "cache").from_cache
    assert "unusable" in caplog.text
    assert _load(edits, tiny_tokenizer, tmp_path / "cache").from_cache


def test_write_is_atomic_and_leaves_no_temp_file(tiny_tokenizer, tmp_path, monkeypatch):
    import numpy as np

    table = TokenTable(np.arange(5, dtype=np.int32), np.array([0, 2, 5]), np.array([1, 2], dtype=np.int32))
    path = tmp_path / "cache" / "k.tok"
    write_cache(path, "k", table, {"fingerprint": "f"})
    assert [e.input_ids for e in read_cache(path, "k")[0]] == [(0, 1), (2, 3, 4)]

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        write_cache(
            path, "k", TokenTable(np.zeros(0, np.int32), np.zeros(1, np.int64), np.zeros(0, np.int32)), {}
        )
    assert [p.name for p in path.parent.iterdir()] == ["k.tok"]  # the old file is intact, no temp left
    assert len(read_cache(path, "k")[0]) == 2


def test_an_unencodable_edit_is_named_and_nothing_is_cached(tiny_tokenizer, tmp_path):
    edits = tmp_path / "edits.jsonl"
    write_jsonl([*_requests(3), EditRequest(prompt="Dorn Asket plays the", target_new="violin " * 80)], edits)
    with pytest.raises(EncodingError, match="edit 4"):
        _load(edits, tiny_tokenizer, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.tok"))


def test_records_come_from_the_cache_without_parsing_the_edit_file(tmp_path, tiny_tokenizer, monkeypatch):
    """With the token cache, a run that needs the records (evaluation, augmentation) maps them too: the edit
    file is parsed once, when the cache is written; later loads parse a record only when it is read."""
    from locft_dist.edits import EditRequest, LocalityProbe, write_jsonl
    from locft_dist.edits import token_cache as tc
    from locft_dist.edits.record_cache import RecordTable

    path = tmp_path / "edits.jsonl"
    probe = (LocalityProbe("Dorn Asket plays the", "violin"),)
    requests = [
        EditRequest(f"Kesso Varn {i} works as a", "glassblower", subject="Kesso", locality_prompts=probe)
        for i in range(5)
    ]
    write_jsonl(requests, path)
    kwargs = {"encoding": Encoding(), "cache_dir": tmp_path / "cache", "need_requests": True}
    first = tc.tokenized_edits(str(path), tiny_tokenizer, **kwargs)
    assert list(first.requests) == requests
    parsed: list[str] = []
    real = tc.load_edits
    monkeypatch.setattr(tc, "load_edits", lambda *a, **k: parsed.append(a[0]) or real(*a, **k))
    again = tc.tokenized_edits(str(path), tiny_tokenizer, **kwargs)
    assert again.from_cache and parsed == [] and isinstance(again.requests, RecordTable)
    assert list(again.requests) == requests and again.requests[-1] == requests[-1]
    record_file = next((tmp_path / "cache").glob("*.rec"))
    record_file.write_bytes(record_file.read_bytes()[:-3])  # damaged: rebuilt from the edit file
    third = tc.tokenized_edits(str(path), tiny_tokenizer, **kwargs)
    assert parsed == [str(path)] and list(third.requests) == requests
