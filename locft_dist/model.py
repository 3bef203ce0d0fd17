"""Load a local Hugging Face causal LM and its tokenizer (never from a hub, no remote code by default)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from locft_dist.errors import ConfigError

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_INDEX = "model.safetensors.index.json"


def check_model_dir(path: str | Path, *, weights: bool = True) -> Path:
    """A local directory with a config.json (and safetensors weights); else a clear error, nothing downloaded.

    Only safetensors weights are read: pickled ``.bin``/``.pt`` checkpoints can run code when loaded.
    """
    if not path:
        raise ConfigError("'model.path' is not set: give a local Hugging Face model directory")
    model_dir = Path(path)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(
            f"model.path {str(path)!r} is not a local Hugging Face model directory (no config.json)"
        )
    if weights and not any((model_dir / n).is_file() for n in ("model.safetensors", SAFETENSORS_INDEX)):
        raise ConfigError(
            f"model.path {str(path)!r} has no model.safetensors(.index.json): only safetensors weights are "
            "loaded (pickled .bin files can run code); re-save the model once with save_pretrained()"
        )
    return model_dir


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    model_dir = check_model_dir(path, weights=False)
    return AutoTokenizer.from_pretrained(
        model_dir, local_files_only=True, trust_remote_code=trust_remote_code
    )


def load_model(path: str | Path, *, dtype: str = "float32", trust_remote_code: bool = False) -> nn.Module:
    """Load on CPU in ``dtype``, in eval mode (dropout off, as in the reference editing loop)."""
    model_dir = check_model_dir(path)
    transformers.utils.logging.disable_progress_bar()  # one bar per shard is noise in our logs
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=DTYPES[dtype],
        local_files_only=True,
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
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


def build_meta_model(
    path: str | Path, *, dtype: str = "float32", trust_remote_code: bool = False
) -> nn.Module:
    """The model's structure on the meta device: no memory for weights until a strategy places its shard."""
    model_dir = check_model_dir(path)
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
        )
    return model.eval()


class SafetensorsCheckpoint:
    """Reads single tensors, or slices of them, from an HF safetensors checkpoint (one file or sharded).

    Only the requested slice is read, so a rank loading its shard of a 72B model never holds a full copy.
    """

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        index = self.model_dir / "model.safetensors.index.json"
        if index.is_file():
            self.files = dict(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
        elif (self.model_dir / "model.safetensors").is_file():
            with safe_open(str(self.model_dir / "model.safetensors"), framework="pt") as handle:
                self.files = dict.fromkeys(handle.keys(), "model.safetensors")
        else:
            raise ConfigError(
                f"{self.model_dir}: no model.safetensors(.index.json); only safetensors is supported"
            )
        self._handles: dict[str, Any] = {}

    def key_for(self, name: str) -> str | None:
        """The checkpoint key of parameter ``name`` (some checkpoints drop the base-model prefix)."""
        if name in self.files:
            return name
        for prefix in ("model.", "transformer.", "gpt_neox."):
            if name.startswith(prefix) and name[len(prefix) :] in self.files:
                return name[len(prefix) :]
        return None

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        key = self.key_for(name)
        if key is None:
            raise ConfigError(f"{self.model_dir}: checkpoint has no tensor for {name!r}")
        file = self.files[key]
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.model_dir / file), framework="pt")
        handle = self._handles[file]
        if index is None:
            return handle.get_tensor(key)
        return handle.get_slice(key)[index]


@torch.no_grad()
def rebuild_nonpersistent_buffers(model: nn.Module, device: torch.device) -> None:
    """Recompute buffers that checkpoints do not store (rotary ``inv_freq``), after ``to_empty``.

    They are functions of the config, so a fresh CPU instance of the owning module gives their values.
    """
    for module in model.modules():
        persistent = set(module.state_dict(keep_vars=True).keys())
        names = [n for n, _ in module.named_buffers(recurse=False) if n not in persistent]
        if not names:
            continue
        config = getattr(module, "config", None) or getattr(model, "config", None)
        try:
            with torch.device("cpu"):
                fresh = type(module)(config)
        except Exception as err:  # an unknown module signature: better a clear error than silent garbage
            raise RuntimeError(
                f"cannot rebuild buffers {names} of {type(module).__name__} after meta-device init: {err}"
            ) from err
        for name in names:
            getattr(module, name).copy_(getattr(fresh, name).to(device))
