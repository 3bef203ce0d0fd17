"""Peak host and device memory, and what the trainable parameters cost, for the logs."""

from __future__ import annotations

import logging
import resource
import sys

import torch
from torch import nn

logger = logging.getLogger(__name__)


def peak_host_bytes() -> int:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def current_host_bytes() -> int | None:
    """Resident memory of this process now (Linux /proc; None elsewhere): RSS at a phase, not the peak."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * resource.getpagesize()
    except OSError:
        return None


def log_host_memory(label: str) -> None:
    """One line with this process's current and peak resident memory, to see which phase holds what."""
    now = current_host_bytes()
    logger.info(
        "host memory %s: rss %s GiB, peak %.2f GiB",
        label,
        "?" if now is None else f"{now / 2**30:.2f}",
        peak_host_bytes() / 2**30,
    )


def peak_device_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return None


def log_memory(label: str, device: torch.device) -> dict[str, float]:
    """Log and return peak host/device memory in GiB."""
    record = {"peak_host_gib": peak_host_bytes() / 2**30}
    device_bytes = peak_device_bytes(device)
    if device_bytes is not None:
        record["peak_device_gib"] = device_bytes / 2**30
    logger.info("memory %s: %s", label, ", ".join(f"{k} {v:.2f}" for k, v in record.items()))
    return record


def local_bytes(tensor: torch.Tensor) -> int:
    """Bytes this rank stores for ``tensor`` (its local shard for a DTensor or a ZeRO-3 parameter)."""
    if hasattr(tensor, "ds_tensor"):  # ZeRO-3 keeps the partition aside and an empty placeholder in place
        tensor = tensor.ds_tensor
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def training_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """This rank's bytes of gradients and optimizer state, and of the trainable and frozen parameters."""
    grads = sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None)
    opt = sum(
        local_bytes(t)
        for state in optimizer.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor)
    )
    trainable = sum(local_bytes(p) for p in model.parameters() if p.requires_grad)
    frozen = sum(local_bytes(p) for p in model.parameters() if not p.requires_grad)
    return {"grad_bytes": grads, "optimizer_bytes": opt, "trainable_bytes": trainable, "frozen_bytes": frozen}
