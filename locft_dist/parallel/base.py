"""The Strategy protocol: the only place that knows about ranks and sharding.

The trainer calls these methods and nothing else distributed, so the same loop runs single-process,
under FSDP2 or under DeepSpeed.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from locft_dist.config import LocateConfig, ModelConfig
from locft_dist.locate import Location


class Strategy(Protocol):
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on the rank that writes files and prints."""
        ...

    def load_model(self, model_cfg: ModelConfig, locate_cfg: LocateConfig) -> tuple[nn.Module, Location]:
        """Load the model placed/sharded for this strategy, with only the located parameters trainable."""
        ...

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """Move/shard a model whose trainable parameters are already chosen (freeze before sharding)."""
        ...

    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of every parameter with requires_grad, in model order."""
        ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (returns the input unchanged for one process)."""
        ...

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def gather_trainable(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Full float32 copies of the trainable tensors keyed by HF parameter name (on CPU, main rank)."""
        ...

    def barrier(self) -> None: ...

    def close(self) -> None:
        """Leave the process group (if any)."""
        ...
