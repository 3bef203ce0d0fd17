"""Add full tensors to a model's parameters whatever their sharding (a delta onto a loaded model).

A plain parameter takes the whole tensor; an FSDP2 ``DTensor`` shard takes the slice of it this rank
holds, so a sharded model is edited without any rank holding more than its shard of the parameter.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset


@torch.no_grad()
def add_to_parameters(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """``param += tensor`` in float32 (cast back to the parameter's dtype) for every named tensor."""
    params = dict(model.named_parameters())
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise KeyError(f"the model has no parameter {missing[0]!r} (and {len(missing) - 1} more)")
    for name, value in tensors.items():
        param = params[name]
        if isinstance(param, DTensor):
            shape, offset = compute_local_shape_and_global_offset(
                param.shape, param.device_mesh, param.placements
            )
            local = param.to_local()
            if local.numel() == 0:
                continue
            value = value[tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))]
            target = local
        elif hasattr(param, "ds_shape"):
            raise NotImplementedError("adding tensors to ZeRO-3 partitioned parameters is not supported")
        else:
            target = param
        target.copy_((target.float() + value.to(device=target.device, dtype=torch.float32)).to(target.dtype))
