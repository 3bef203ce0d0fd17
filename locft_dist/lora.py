"""LoRA on the localized modules (through ``peft``), as an alternative to tuning their full weights.

Only the low-rank factors train; the delta file stays the contract's merged additive float32 delta
(``base + scale * B @ A - base`` per localized weight), so ``locft apply``/``eval`` never see LoRA.
Single process only: the FSDP and DeepSpeed strategies shard and save the full localized weights.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from locft_dist.config import LoraConfig
from locft_dist.errors import ConfigError, LocateError

logger = logging.getLogger(__name__)

ADAPTER = "default"


def _module_names(parameter_names: Sequence[str]) -> list[str]:
    names = []
    for name in parameter_names:
        if not name.endswith(".weight"):
            raise LocateError(
                f"lora.rank > 0 adapts weight matrices only; the location includes {name}: "
                "choose modules without biases (e.g. mlp.down_proj) or set lora.rank=0"
            )
        names.append(name[: -len(".weight")])
    return names


def attach_lora(model: nn.Module, parameter_names: Sequence[str], cfg: LoraConfig, *, seed: int) -> nn.Module:
    """Wrap the modules owning ``parameter_names`` with LoRA; only the LoRA factors stay trainable."""
    try:
        import peft
    except ImportError:  # pragma: no cover - peft is in the dev extra
        raise ConfigError("lora.rank > 0 needs peft: pip install 'locft-dist[peft]'") from None
    modules = _module_names(parameter_names)
    for name in modules:
        if not isinstance(model.get_submodule(name), nn.Linear):
            raise LocateError(f"lora.rank > 0 supports nn.Linear modules; {name} is not one")
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)  # LoRA's A is initialized randomly (B is zero, so the start is the base)
    config = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=modules)
    model = peft.inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)
    num = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("LoRA rank %d (alpha %g) on %s: %d trainable parameters", cfg.rank, cfg.alpha, modules, num)
    return model


def merged_weights(model: nn.Module, parameter_names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The localized weights with the LoRA update merged in, float32 on CPU, keyed by base names."""
    merged = {}
    for param_name, module_name in zip(parameter_names, _module_names(parameter_names), strict=True):
        module = model.get_submodule(module_name)
        with torch.no_grad():
            weight = module.get_base_layer().weight.float() + module.get_delta_weight(ADAPTER).float()
        merged[param_name] = weight.detach().cpu().clone()
    return merged
