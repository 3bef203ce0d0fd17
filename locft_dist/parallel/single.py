"""One process, one device: the reference strategy the distributed ones must agree with.

A model loaded in bfloat16/float16 trains float32 master weights, as FSDP and DeepSpeed do
(``parallel/master_weights.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from locft_dist.config import LocateConfig, ModelConfig
from locft_dist.locate import Location, freeze_all_but, resolve_location
from locft_dist.model import load_model
from locft_dist.parallel.base import TorchOptimizer
from locft_dist.parallel.master_weights import casts_for_matmul, keep_fp32_master
from locft_dist.subject_rows import subject_embedding_location


def pick_device(spec: str = "auto") -> torch.device:
    """``auto`` is CUDA when available, else CPU; anything else is passed to torch.device."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


class SingleProcess(TorchOptimizer):
    """Strategy for one process: no communication, the model stays whole."""

    rank = 0
    world_size = 1
    supports_prefix_offload = True
    defers_step_bookkeeping = True
    """The model is whole and was loaded from safetensors: the frozen prefix can be freed and reloaded."""

    def __init__(self, device: torch.device | str = "auto") -> None:
        self.device = device if isinstance(device, torch.device) else pick_device(device)

    @property
    def is_main(self) -> bool:
        return True

    def load_model(self, model_cfg: ModelConfig, locate_cfg: LocateConfig) -> tuple[nn.Module, Location]:
        """Load whole, choose and freeze, keep fp32 masters of the trainable tensors, move to the device."""
        model = load_model(
            model_cfg.path, dtype=model_cfg.dtype, trust_remote_code=model_cfg.trust_remote_code
        )
        if locate_cfg.subject_embeddings:  # which rows move is decided with the edits (edit_job)
            location = subject_embedding_location(model)
        else:
            location = resolve_location(model, locate_cfg.layers, locate_cfg.modules)
        freeze_all_but(model, location.parameter_names)
        # exact fp32 base values from the checkpoint; on a GPU the matmuls run in the model's dtype
        keep_fp32_master(model, model_cfg.path, cast_for_matmul=casts_for_matmul(self.device))
        return self.wrap_model(model), location

    def wrap_model(self, model: nn.Module) -> nn.Module:
        keep_fp32_master(model, cast_for_matmul=casts_for_matmul(self.device))
        return model.to(self.device)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast_object(self, obj: Any) -> Any:
        return obj

    def gather_trainable(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {
            n: p.detach().to(device="cpu", dtype=torch.float32).clone()
            for n, p in self.trainable_parameters(model)
        }

    def barrier(self) -> None:
        return None

    def close(self) -> None:
        return None
