"""One process, one device: the reference strategy the distributed ones must agree with."""

from __future__ import annotations

import torch
from torch import nn


def pick_device(spec: str = "auto") -> torch.device:
    """``auto`` is CUDA when available, else CPU; anything else is passed to torch.device."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


class SingleProcess:
    """Strategy for one process: no communication, the model stays whole."""

    rank = 0
    world_size = 1

    def __init__(self, device: torch.device | str = "auto") -> None:
        self.device = device if isinstance(device, torch.device) else pick_device(device)

    @property
    def is_main(self) -> bool:
        return True

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def gather_trainable(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {
            n: p.detach().to(device="cpu", dtype=torch.float32).clone()
            for n, p in self.trainable_parameters(model)
        }

    def barrier(self) -> None:
        return None
