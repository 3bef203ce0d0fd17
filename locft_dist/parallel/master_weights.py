"""fp32 master weights for the trainable parameters of a bfloat16/float16 model in one process.

bfloat16 keeps 8 significant bits: an Adam step moves a weight by about ``lr``, and a weight of magnitude
``|w|`` only changes if ``lr > ~|w| / 256``. At an editing learning rate of 1e-4 to 5e-4 most updates to a
bf16 weight round back to the same value, so a bf16 run that steps bf16 weights learns little or nothing.
FSDP keeps float32 parameters and casts them for compute (``MixedPrecisionPolicy``); DeepSpeed keeps
float32 master partitions. One process does the equivalent with less machinery: the trainable parameters
themselves become float32, so the optimizer, its state, checkpoints, the delta (fp32 master - base) and
LoRA adapters built on them are float32 without further code.

What the modules that own them compute in depends on the device (``cast_for_matmul``):

- On a GPU, in the model's dtype, as FSDP's ``MixedPrecisionPolicy`` does: a linear layer casts its float32
  master to bf16/fp16 for the matmul, and autograd casts the weight gradient back to float32. A float32
  matmul runs at a fourteenth of the bf16 rate on an H100 (52 against 720 TFLOP/s measured), so computing
  Llama-3-8B's ``down_proj`` in float32 would make it cost more than the rest of the layer.
- On CPU, in float32 (floating inputs cast up, outputs cast back to the model's dtype): CPUs without bf16
  matrix units compute bf16 matmuls no faster than float32 ones, and the cast would be extra work.
  Measured on CPU (SmolLM2-135M, one down_proj, see docs/real_models.md): a float32 edited module costs a
  few percent of a training step.

Modules other than ``nn.Linear`` (norms, a whole layer's other tensors) compute in float32 everywhere:
they are elementwise work, not matmuls.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

MASTER_DTYPE = torch.float32


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
        return value.to(dtype)
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    if isinstance(value, list):
        return [_cast(v, dtype) for v in value]
    return value


class _Fp32Compute:
    """Forward hooks of one module: inputs to float32, outputs back to ``out_dtype``."""

    def __init__(self, out_dtype: torch.dtype) -> None:
        self.out_dtype = out_dtype

    def before(self, _module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _cast(args, MASTER_DTYPE), {k: _cast(v, MASTER_DTYPE) for k, v in kwargs.items()}

    def after(self, _module: nn.Module, _args: tuple, _kwargs: dict, output: Any) -> Any:
        return _cast(output, self.out_dtype)


class _CastMasterLinear(nn.Linear):
    """An ``nn.Linear`` whose float32 master weight is cast to ``matmul_dtype`` for its matmul (the class
    of a module is swapped in place, so names, state dicts and hooks stay as they are)."""

    matmul_dtype: torch.dtype
    """Not ``compute_dtype``: peft reads that attribute as a quantized layer's and would build LoRA factors
    in it (bf16 factors, whose small updates round away)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        dtype = self.matmul_dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return nn.functional.linear(input.to(dtype), self.weight.to(dtype), bias)


def casts_for_matmul(device: torch.device | str) -> bool:
    """Whether the edited linear layers on ``device`` cast their master for the matmul (``cast_for_matmul``):
    everywhere but on CPU (see the module docstring)."""
    return torch.device(device).type != "cpu"


def keep_fp32_master(
    model: nn.Module, model_dir: str | Path | None = None, *, cast_for_matmul: bool = False
) -> list[str]:
    """Make every trainable parameter float32; returns the modules changed.

    With ``cast_for_matmul`` (on a GPU) an ``nn.Linear`` owner computes in the parameter's former dtype
    (the model's) from a cast of its master; other owners, and every owner without it, compute in float32.
    With ``model_dir`` the float32 values are read from the checkpoint on disk, so the master starts at
    the exact base (a bf16 copy would start the delta off by the rounding error). A model already in
    float32, or whose trainable parameters are, is left as it is. Call after choosing what is trainable.
    """
    owners = {}
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad and param.dtype != MASTER_DTYPE:
                owners.setdefault(module_name, (module, param.dtype, []))[2].append(name)
    if not owners:
        return []
    checkpoint = None
    if model_dir is not None:
        from locft_dist.model import SafetensorsCheckpoint

        checkpoint = SafetensorsCheckpoint(model_dir)
    for module_name, (module, dtype, names) in owners.items():
        for name in names:
            param = getattr(module, name)
            full_name = f"{module_name}.{name}" if module_name else name
            with torch.no_grad():
                if checkpoint is not None and checkpoint.key_for(full_name) is not None:
                    param.data = checkpoint.read(full_name).to(device=param.device, dtype=MASTER_DTYPE)
                else:
                    param.data = param.data.to(MASTER_DTYPE)
        if cast_for_matmul and type(module) is nn.Linear:
            module.__class__ = _CastMasterLinear
            module.matmul_dtype = dtype
            continue
        hooks = _Fp32Compute(dtype)
        module.register_forward_pre_hook(hooks.before, with_kwargs=True)
        module.register_forward_hook(hooks.after, with_kwargs=True)
    logger.info(
        "fp32 master weights for %d trainable tensors in %d modules (the model computes in %s, the "
        "trainable linear layers in %s)",
        sum(len(n) for _, _, n in owners.values()),
        len(owners),
        next(iter(owners.values()))[1],
        "the model's dtype" if cast_for_matmul else "float32",
    )
    return list(owners)
