"""Load a local Hugging Face causal LM and its tokenizer (never from a hub, no remote code by default)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from locft_dist.errors import ConfigError

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_model_dir(path: str | Path) -> Path:
    """A local directory with a config.json; anything else is a clear error (nothing is downloaded)."""
    if not path:
        raise ConfigError("'model.path' is not set: give a local Hugging Face model directory")
    model_dir = Path(path)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(
            f"model.path {str(path)!r} is not a local Hugging Face model directory (no config.json)"
        )
    return model_dir


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    model_dir = check_model_dir(path)
    return AutoTokenizer.from_pretrained(
        model_dir, local_files_only=True, trust_remote_code=trust_remote_code
    )


def load_model(path: str | Path, *, dtype: str = "float32", trust_remote_code: bool = False) -> nn.Module:
    """Load on CPU in ``dtype``, in eval mode (dropout off, as in the reference editing loop)."""
    model_dir = check_model_dir(path)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=DTYPES[dtype], local_files_only=True, trust_remote_code=trust_remote_code
    )
    model.eval()
    logger.info(
        "loaded %s (%s, %.1fM parameters, %s)",
        model_dir,
        type(model).__name__,
        sum(p.numel() for p in model.parameters()) / 1e6,
        dtype,
    )
    return model
