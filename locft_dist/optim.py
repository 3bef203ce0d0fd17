"""Optimizer and learning-rate schedule over the localized parameters only."""

from __future__ import annotations

import math

import torch
from torch import nn

from locft_dist.config import TrainConfig


def build_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam or AdamW over exactly ``params`` (all must require grad)."""
    if not params:
        raise ValueError("no trainable parameters: the location selected nothing")
    assert all(p.requires_grad for p in params), "optimizer given a frozen parameter"
    kwargs = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.adam_eps, "weight_decay": cfg.weight_decay}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    return torch.optim.Adam(params, **kwargs)


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then constant/linear/cosine to zero.

    A pure function of the step, so a resumed run needs no scheduler state.
    """
    warmup = max(cfg.warmup_steps, 0)
    if warmup and step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
    if cfg.lr_schedule == "linear":
        return cfg.lr * (1.0 - progress)
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def assert_state_owned_by(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """Invariant: the optimizer's groups and state hold the localized parameters and nothing else."""
    owned = {id(p) for p in params}
    in_groups = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_groups == owned, "optimizer param groups differ from the localized parameters"
    assert all(id(p) in owned for p in optimizer.state), "optimizer holds state for a frozen parameter"


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of tensors in the optimizer state (moments), for memory accounting."""
    return sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor)
    )
