"""Start a wave from base + the previous wave's delta, under any strategy.

The model is loaded from the base as usual (so the unedited reference predictions are the base's), then the
trainable tensors are overwritten with base + delta. Every rank reads the delta and the base values of the
localized tensors only (never the whole model) and keeps its own shard of them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from locft_dist.checkpoint import TensorStateIO
from locft_dist.config import TrainConfig
from locft_dist.delta import Delta, read_base_tensors
from locft_dist.parallel.base import Strategy
from locft_dist.parallel.reshard import local_rows


def start_weights(model_dir: str | Path, delta: Delta) -> dict[str, torch.Tensor]:
    """base + delta in float32 for every tensor the delta touches."""
    base = read_base_tensors(model_dir, list(delta.tensors))
    return {name: base[name].float() + tensor for name, tensor in delta.tensors.items()}


@torch.no_grad()
def set_trainable(
    strategy: Strategy, model: nn.Module, weights: dict[str, torch.Tensor], train_cfg: TrainConfig
) -> None:
    """Overwrite every trainable tensor (its fp32 master included) with ``weights`` (full tensors on every
    rank), before training builds its optimizer. A collective under FSDP and DeepSpeed."""
    names = [name for name, _ in strategy.trainable_parameters(model)]
    if sorted(names) != sorted(weights):
        raise ValueError(f"start weights for {sorted(weights)}, the model trains {sorted(names)}")
    if isinstance(strategy, TensorStateIO):  # DeepSpeed: the engine owns the fp32 master partitions
        template = strategy.checkpoint_template(model, False)
        for name, rows in template["model"].items():
            rows.to_local().copy_(local_rows(weights[name], strategy.rank, strategy.world_size))
        strategy.load_checkpoint_tensors(model, strategy.build_optimizer(model, train_cfg), template)
        return
    for name, param in strategy.trainable_parameters(model):
        full = weights[name]
        if not isinstance(param, DTensor):
            param.copy_(full.to(device=param.device, dtype=param.dtype))
            continue
        mesh, placements = param.device_mesh, param.placements
        shape, offset = compute_local_shape_and_global_offset(param.shape, mesh, placements)
        local = param.to_local()
        if local.numel():
            index = tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))
            local.copy_(full[index].to(device=local.device, dtype=local.dtype))
