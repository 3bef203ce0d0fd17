"""The Strategy protocol: the only place that knows about ranks and sharding.

The trainer calls these methods and nothing else distributed, so the same loop runs single-process,
under FSDP2 or under DeepSpeed.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from locft_dist.config import LocateConfig, ModelConfig, TrainConfig
from locft_dist.locate import Location
from locft_dist.optim import assert_state_owned_by, build_optimizer, set_lr


class Strategy(Protocol):
    rank: int
    world_size: int
    device: torch.device
    defers_step_bookkeeping: bool
    """A step's loss read, log line and checkpoint hook may run after the next step's passes are queued
    (``trainer.train_breadth_first``): the checkpoint is then saved with the next step's gradients
    computed but not applied, which FSDP2 and one process ignore."""

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

    def build_optimizer(self, model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
        """The optimizer over the trainable parameters only (DeepSpeed: the engine's ZeRO optimizer)."""
        ...

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None: ...

    def optimizer_step(self, optimizer: torch.optim.Optimizer, lr: float, max_norm: float | None) -> None:
        """Clip the global gradient norm (if ``max_norm``), set the lr, step."""
        ...

    def check_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Assert the optimizer holds the trainable parameters and nothing else."""
        ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (returns the input unchanged for one process)."""
        ...

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable, made by this job), in rank order, on every rank."""
        ...

    def broadcast_object(self, obj: Any) -> Any:
        """The main rank's ``obj`` on every rank (the others pass None)."""
        ...

    def gather_trainable(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Full float32 copies of the trainable tensors keyed by HF parameter name, on CPU, on the main rank
        only (the others get an empty dict); a collective."""
        ...

    def barrier(self) -> None: ...

    def close(self) -> None:
        """Leave the process group (if any)."""
        ...


class TorchOptimizer:
    """Optimizer handling shared by the strategies that drive a plain torch optimizer (single, FSDP)."""

    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def build_optimizer(self, model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
        return build_optimizer([p for _, p in self.trainable_parameters(model)], cfg)

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    def optimizer_step(self, optimizer: torch.optim.Optimizer, lr: float, max_norm: float | None) -> None:
        if max_norm is not None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        set_lr(optimizer, lr)
        optimizer.step()

    def check_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        assert_state_owned_by(optimizer, [p for _, p in self.trainable_parameters(model)])
