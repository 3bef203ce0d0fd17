"""FSDP2 (``fully_shard``) strategy: each decoder layer, the embedding, the output layer and the root
sharded across ranks.

Order of operations, so that no rank ever holds the whole model: build on the meta device -> resolve the
location and freeze everything else -> shard -> allocate each rank's shard (``to_empty``) -> read exactly
that shard's slices from the safetensors checkpoint -> recompute non-persistent buffers.

Launch: ``torchrun --nproc_per_node N -m locft_dist.cli edit ...`` (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from locft_dist.config import DistConfig, LocateConfig, ModelConfig
from locft_dist.locate import Location, find_decoder_layers, freeze_all_but, resolve_location
from locft_dist.model import DTYPES, SafetensorsCheckpoint, build_meta_model, rebuild_nonpersistent_buffers
from locft_dist.parallel.base import TorchOptimizer
from locft_dist.parallel.memory import log_memory
from locft_dist.parallel.process_group import ProcessGroupCollectives, init_process_group
from locft_dist.parallel.reshard import gather_rows

logger = logging.getLogger(__name__)


def embedding_units(model: nn.Module) -> list[nn.Module | list[nn.Module]]:
    """The FSDP units of the input embedding and the output layer: apart, or together when tied."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None:
        return [embed]
    if head.weight is embed.weight:
        return [[embed, head]]
    return [embed, head]


class FSDPStrategy(ProcessGroupCollectives, TorchOptimizer):
    """FSDP2 over all ranks of the job (one data-parallel dimension)."""

    defers_step_bookkeeping = True

    def __init__(self, dist_cfg: DistConfig, device_spec: str = "auto") -> None:
        self.rank, self.world_size, self.device = init_process_group(device_spec, dist_cfg.timeout_minutes)
        self.mesh = init_device_mesh(self.device.type, (self.world_size,))
        param_dtype = DTYPES[dist_cfg.param_dtype] if dist_cfg.param_dtype else None
        self.mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)

    def load_model(self, model_cfg: ModelConfig, locate_cfg: LocateConfig) -> tuple[nn.Module, Location]:
        """Meta build -> freeze -> shard -> load this rank's slices; trainable parameters stay float32."""
        model = build_meta_model(
            model_cfg.path, dtype=model_cfg.dtype, trust_remote_code=model_cfg.trust_remote_code
        )
        location = resolve_location(model, locate_cfg.layers, locate_cfg.modules)
        trainable = freeze_all_but(model, location.parameter_names)
        for _, param in trainable:  # fp32 master copy; mp_policy.param_dtype sets the compute dtype
            param.data = param.data.float()
        if self.mp_policy.param_dtype is None and model_cfg.dtype != "float32":
            # FSDP all-gathers a layer in one dtype: compute in the model's dtype, keep fp32 master shards.
            self.mp_policy = MixedPrecisionPolicy(
                param_dtype=DTYPES[model_cfg.dtype], reduce_dtype=torch.float32
            )
        self._shard(model)
        model.to_empty(device=self.device)
        self._load_shards(model, model_cfg.path)
        rebuild_nonpersistent_buffers(model, self.device)
        log_memory("after loading the sharded model", self.device)
        return model, location

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """Shard an already materialized (small) model in place."""
        model.to(self.device)
        self._shard(model)
        return model

    def _shard(self, model: nn.Module) -> None:
        """One FSDP unit per decoder layer, one for the input embedding and one for the output layer (one
        for both when they share the weight), and the root for the rest (the final norm).

        Every unit but the root is resharded after its forward, so a pass without backward (evaluation,
        generation, the prefix-cache fill) leaves nothing gathered, and a pass from cached hidden states,
        which never calls the embedding, never gathers it.
        """
        layout = find_decoder_layers(model)
        for layer in model.get_submodule(layout.layers_path):
            fully_shard(layer, mesh=self.mesh, mp_policy=self.mp_policy)
        for unit in embedding_units(model):
            fully_shard(unit, mesh=self.mesh, mp_policy=self.mp_policy, reshard_after_forward=True)
        fully_shard(model, mesh=self.mesh, mp_policy=self.mp_policy)

    @torch.no_grad()
    def _load_shards(self, model: nn.Module, model_dir: str) -> None:
        checkpoint = SafetensorsCheckpoint(model_dir)
        for name, param in model.named_parameters():
            self._copy_slice(checkpoint, name, param)
        for name, buffer in model.named_buffers():
            if checkpoint.key_for(name) is not None:
                buffer.copy_(checkpoint.read(name).to(buffer.dtype))

    def _copy_slice(self, checkpoint: SafetensorsCheckpoint, name: str, param: nn.Parameter) -> None:
        if not isinstance(param, DTensor):
            param.copy_(checkpoint.read(name).to(param.dtype))
            return
        shape, offset = compute_local_shape_and_global_offset(
            param.shape, param.device_mesh, param.placements
        )
        local = param.to_local()
        if local.numel() == 0:
            return
        index = tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))
        local.copy_(checkpoint.read(name, index).to(device=local.device, dtype=local.dtype))

    def backward(self, loss: torch.Tensor) -> None:
        # FSDP averages gradients over ranks; the trainer's loss is already a share of the global mean.
        (loss * self.world_size).backward()

    def gather_trainable(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Full float32 copies of the trainable tensors on rank 0, gathered one tensor at a time; the other
        ranks get an empty dict and never hold a whole tensor (a collective: every rank must call it)."""
        out = {}
        for name, param in self.trainable_parameters(model):
            if isinstance(param, DTensor):
                assert [type(p).__name__ for p in param.placements] == ["Shard"], param.placements
                full = gather_rows(param.to_local().detach(), param.shape[0], self.rank, self.world_size)
            else:
                full = param.detach() if self.rank == 0 else None
            if full is not None:
                out[name] = full.to(device="cpu", dtype=torch.float32).clone()
        return out
