import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from locft_dist.delta import (
    FORMAT,
    apply_delta_to_dir,
    apply_delta_to_model,
    compute_delta,
    fingerprint_tensors,
    read_delta,
    write_delta,
)
from locft_dist.errors import DeltaError

NAME = "model.layers.2.mlp.down_proj.weight"


def make_delta(model_dir, tmp_path, scale=0.01, seed=0):
    base_model = AutoModelForCausalLM.from_pretrained(model_dir)
    base = {NAME: dict(base_model.named_parameters())[NAME].detach().clone()}
    edited = {
        NAME: base[NAME]
        + scale * torch.randn(base[NAME].shape, generator=torch.Generator().manual_seed(seed))
    }
    path = write_delta(
        tmp_path / "delta.safetensors",
        compute_delta(edited, base),
        base_model=str(model_dir),
        base_fingerprint=fingerprint_tensors(base),
        config_json=json.dumps({"train": {"lr": 1}}),
    )
    return path, base, edited


def test_file_follows_the_contract(tiny_model_dir, tmp_path):
    path, base, edited = make_delta(tiny_model_dir, tmp_path)
    tensors = load_file(str(path))
    assert list(tensors) == [NAME]
    assert tensors[NAME].dtype == torch.float32
    torch.testing.assert_close(base[NAME] + tensors[NAME], edited[NAME])
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["locft.format"] == FORMAT
    assert meta["locft.base_model"] == str(tiny_model_dir)
    assert meta["locft.base_fingerprint"] == fingerprint_tensors(base)
    assert json.loads(meta["locft.config"]) == {"train": {"lr": 1}}
    assert not list(tmp_path.glob(".delta-*"))  # no temp file left


def test_fingerprint_ignores_dtype_but_not_values():
    t = {"a": torch.arange(6.0).view(2, 3)}
    assert fingerprint_tensors(t) == fingerprint_tensors({"a": t["a"].to(torch.bfloat16)})
    assert fingerprint_tensors(t) != fingerprint_tensors({"a": t["a"] + 1})
    assert fingerprint_tensors(t) != fingerprint_tensors({"b": t["a"]})


def test_apply_to_dir_equals_plain_transformers_addition(tiny_model_dir, tmp_path):
    path, _, _ = make_delta(tiny_model_dir, tmp_path)
    out = apply_delta_to_dir(tiny_model_dir, path, tmp_path / "edited")
    edited_model = AutoModelForCausalLM.from_pretrained(out)
    manual = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    delta = load_file(str(path))
    with torch.no_grad():
        for name, param in manual.named_parameters():
            if name in delta:
                param.add_(delta[name])
    for (n1, p1), (_, p2) in zip(edited_model.named_parameters(), manual.named_parameters(), strict=True):
        assert torch.equal(p1, p2), n1
    assert (out / "tokenizer.json").is_file()


def test_apply_to_model_in_memory(tiny_model_dir, tmp_path):
    path, _, edited = make_delta(tiny_model_dir, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    apply_delta_to_model(model, read_delta(path))
    torch.testing.assert_close(dict(model.named_parameters())[NAME].detach(), edited[NAME])


def test_a_delta_for_another_base_is_refused(tiny_model_dir, tmp_path):
    path, _, _ = make_delta(tiny_model_dir, tmp_path)
    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        dict(other.named_parameters())[NAME].add_(1e-3)
    with pytest.raises(DeltaError, match="not the base this delta was made for"):
        apply_delta_to_model(other, read_delta(path), source="other")
    other_dir = tmp_path / "other"
    other.save_pretrained(other_dir)
    with pytest.raises(DeltaError, match="not the base"):
        apply_delta_to_dir(other_dir, path, tmp_path / "never")
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("damage", ["truncate", "format", "missing"])
def test_broken_delta_files_are_clear_errors(tiny_model_dir, tmp_path, damage):
    path, _, _ = make_delta(tiny_model_dir, tmp_path)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:40])
        match = "not a readable safetensors file"
    elif damage == "format":
        from safetensors.torch import save_file

        save_file(load_file(str(path)), str(path), metadata={"locft.format": "delta/0"})
        match = "locft.format"
    else:
        path.unlink()
        match = "no such delta file"
    with pytest.raises(DeltaError, match=match):
        read_delta(path)


def test_existing_output_dir_is_not_overwritten(tiny_model_dir, tmp_path):
    path, _, _ = make_delta(tiny_model_dir, tmp_path)
    (tmp_path / "taken").mkdir()
    with pytest.raises(DeltaError, match="already exists"):
        apply_delta_to_dir(tiny_model_dir, path, tmp_path / "taken")
