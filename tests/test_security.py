"""Security rules checked on the package source: no unpickling, no remote code, no shell, safetensors only."""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest

from locft_dist.config import RunConfig
from locft_dist.errors import ConfigError
from locft_dist.model import check_model_dir, load_model
from tests.conftest import REPO

SOURCES = sorted((REPO / "locft_dist").rglob("*.py")) + sorted((REPO / "launch").glob("*.py"))


def _calls(name: str) -> list[tuple[Path, ast.Call]]:
    """Every call whose dotted function name ends with ``name`` (e.g. ``torch.load``, ``from_pretrained``)."""
    found = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith(name):
                found.append((path, node))
    return found


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_no_pickle_loads():
    for path, call in _calls("torch.load"):
        assert _is_true(_keyword(call, "weights_only")), f"{path}: {ast.unparse(call)}"
    for path in SOURCES:
        source = path.read_text(encoding="utf-8")
        assert not re.search(r"^\s*(import|from)\s+(pickle|dill|cloudpickle|joblib)\b", source, re.M), path


def test_trust_remote_code_is_off_by_default():
    assert RunConfig().model.trust_remote_code is False
    calls = _calls("from_pretrained")
    assert calls
    for path, call in calls:
        assert not _is_true(_keyword(call, "trust_remote_code")), f"{path}: {ast.unparse(call)}"


def test_weights_and_deltas_are_safetensors_only(tiny_model_dir, tmp_path):
    calls = _calls("AutoModelForCausalLM.from_pretrained")
    assert calls
    for path, call in calls:  # safetensors, or a GGUF file (tensors and metadata, nothing pickled)
        loads_gguf = _keyword(call, "gguf_file") is not None
        assert _is_true(_keyword(call, "use_safetensors")) or loads_gguf, f"{path}: {ast.unparse(call)}"
    pickled = tmp_path / "pickled_model"
    pickled.mkdir()
    shutil.copy(tiny_model_dir / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"never read")
    with pytest.raises(ConfigError, match="only safetensors weights are loaded"):
        load_model(pickled)
    assert check_model_dir(pickled, weights=False) == pickled  # the tokenizer needs no weights
    assert not _calls("torch.save"), "deltas and models are written with safetensors only"


def test_no_shell_commands():
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                func = ast.unparse(node.func)
                assert func not in ("os.system", "os.popen", "eval", "exec"), f"{path}: {func}"
                assert not _is_true(_keyword(node, "shell")), f"{path}: {ast.unparse(node)}"
