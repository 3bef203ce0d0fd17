"""Is a rerun the same run? Path spellings, harmless keys, content fingerprints; the run record's phases."""

from __future__ import annotations

import os
import shutil

import pytest

from locft_dist.config import load_config
from locft_dist.errors import ConfigError
from locft_dist.run.compat import (
    Identity,
    check_compatible,
    compare,
    flat_config,
    model_fingerprint,
    resolve_paths,
)
from locft_dist.run.layout import RunDir, eval_settings

IDENTITY = Identity(model="m" * 32, edits="e" * 16)


def _flat(overrides: list[str], cwd) -> dict:
    here = os.getcwd()
    os.chdir(cwd)
    try:
        return flat_config(resolve_paths(load_config(None, overrides)).to_dict())
    finally:
        os.chdir(here)


def test_path_spellings_from_other_directories_are_the_same_run(tmp_path):
    (tmp_path / "sub").mkdir()
    first = _flat(["edits.path=./zsre.jsonl", "output.dir=runs/x", "model.path=~/m"], tmp_path)
    second = _flat(
        [f"edits.path={tmp_path}/sub/../zsre.jsonl", "output.dir=../runs/./x/", "model.path=~/m/"],
        tmp_path / "sub",
    )
    assert first["edits.path"] == str(tmp_path / "zsre.jsonl")
    assert first["model.path"] == os.path.expanduser("~/m")
    comparison = compare(first, IDENTITY, second, IDENTITY)
    assert comparison.refused == [] and comparison.allowed == []


@pytest.mark.parametrize(
    "override",
    [
        "train.progress=false",
        "eval.batch_size=8",
        "output.keep_last=5",
        "train.micro_batch_tokens=128",
        "train.micro_batch_size=3",
        "train.prefix_cache=false",
        "train.prefix_cache_host_gib=1.5",
        "train.prefix_cache_device_gib=2",
        "output.overwrite=true",
        "output.checkpoint_every=7",
        "logging.wandb_project=p",
        "dist.strategy=fsdp",
        "edits.token_cache=false",
    ],
)
def test_keys_that_do_not_change_results_are_allowed_and_logged(tmp_path, override, caplog):
    base = _flat([], tmp_path)
    changed = _flat([override], tmp_path)
    comparison = compare(base, IDENTITY, changed, IDENTITY)
    key = override.split("=")[0]
    assert comparison.refused == [] and [k for k, _, _ in comparison.allowed] == [key]
    with caplog.at_level("INFO", logger="locft_dist.run.compat"):
        check_compatible(tmp_path, comparison)
    assert f"{key} " in caplog.text and "results unaffected" in caplog.text


def test_a_refusal_names_each_key_with_both_values_and_keeps_the_checkpoints(tmp_path):
    base = _flat(["train.lr=5e-4", "edits.path=e.jsonl"], tmp_path)
    changed = _flat(
        ["train.lr=1e-3", "locate.layers=[3]", "edits.max_length=64", "edits.path=e.jsonl"], tmp_path
    )
    other = Identity(model=IDENTITY.model, edits="f" * 16)
    comparison = compare(base, IDENTITY, changed, other)
    with pytest.raises(ConfigError) as err:
        check_compatible(tmp_path, comparison)
    message = str(err.value)
    for line in (
        "train.lr: 0.0005 in the run, 0.001 now",
        "locate.layers: [-1] in the run, [3] now",
        "edits.max_length: 256 in the run, 64 now",
        f"edits content ({tmp_path / 'e.jsonl'}): 'fingerprint {'e' * 16}' in the run, "
        f"'fingerprint {'f' * 16}' now",
        f"locft edit --config {tmp_path / 'config.yaml'}",
        "its checkpoints are kept",
    ):
        assert line in message, message


def test_the_edit_file_may_move_when_its_content_is_the_same(tmp_path):
    """model.path/edits.path are covered by the content fingerprints; without an identity they are not."""
    base = _flat(["edits.path=a.jsonl"], tmp_path)
    moved = _flat(["edits.path=b.jsonl"], tmp_path)
    assert compare(base, IDENTITY, moved, IDENTITY).refused == []
    assert [k for k, _, _ in compare(base, None, moved, IDENTITY).refused] == ["edits.path"]


def test_a_config_of_an_older_version_is_read_with_todays_defaults(tmp_path):
    tree = load_config(None, []).to_dict()
    del tree["train"]["micro_batch_pass_cost"]
    tree["train"]["retired_key"] = 3
    assert compare(flat_config(tree), IDENTITY, _flat([], tmp_path), IDENTITY).refused == []


def test_model_fingerprint_sees_weights_and_tokenizer_not_the_directory(tiny_model_dir, tmp_path):
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    assert model_fingerprint(copy) == model_fingerprint(tiny_model_dir)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x10
    weights.write_bytes(bytes(data))
    assert model_fingerprint(copy) != model_fingerprint(tiny_model_dir)
    copy2 = shutil.copytree(tiny_model_dir, tmp_path / "copy2")
    with open(copy2 / "tokenizer_config.json", "a") as handle:
        handle.write(" ")
    assert model_fingerprint(copy2) != model_fingerprint(tiny_model_dir)


def test_phases_are_recorded_in_order(tmp_path):
    run = RunDir(tmp_path)
    run.start("model: {}\n", IDENTITY)
    settings = eval_settings(load_config(None, []).eval)
    assert not run.delta_done()
    run.mark("trained", num_steps=3)
    run.delta.write_bytes(b"x")
    run.mark("delta")
    run.metrics.write_text("{}")
    run.mark("evaluated", eval=settings)
    again = RunDir(tmp_path)
    again.load_record()
    assert again.identity == IDENTITY and again.delta_done() and again.evaluated(settings)
    assert not again.evaluated({**settings, "max_new_tokens": 8}), "other evaluation settings: evaluate again"
    again.mark("trained", num_steps=4)  # training again invalidates what came after it
    assert again.phase("delta") is None and again.phase("evaluated") is None
    assert oct(run.record_path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
