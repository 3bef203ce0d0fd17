"""Free the frozen prefix (decoder layers below the cache's first layer, and the input embedding) while
training runs from the prefix cache, and bring it back from the model's safetensors files afterwards.

Once the cache is filled no training pass touches those modules, so one process may release their
parameters (moved to the meta device: no storage at all) and reload them from the checkpoint the model was
loaded from before evaluation, which needs the full model. The input embedding stays when the output head
shares its weight.

Sharded strategies keep them: FSDP2 and ZeRO-3 already hold only ``1/world_size`` of each frozen tensor per
rank, and their parameter bookkeeping (FSDP2's parameter groups, ZeRO's partitions and module hooks) would
have to be rebuilt around the freed tensors; ZeRO-2 keeps the whole model on every rank by design.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from locft_dist.errors import ConfigError
from locft_dist.model import SafetensorsCheckpoint

logger = logging.getLogger(__name__)


def prefix_modules(model: nn.Module, layers_path: str, first_layer: int) -> dict[str, nn.Module]:
    """Name -> module of what no pass from ``first_layer`` on uses (none of it trainable)."""
    layers = model.get_submodule(layers_path)
    out = {f"{layers_path}.{i}": layers[i] for i in range(first_layer)}
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if embed is not None and (head is None or head.weight is not embed.weight):
        out.update((name, m) for name, m in model.named_modules() if m is embed)
    return out


class PrefixOffload:
    """The freed prefix of one single-process model, and how to restore it."""

    def __init__(self, model: nn.Module, layers_path: str, first_layer: int, device: torch.device) -> None:
        self.model = model
        self.modules = prefix_modules(model, layers_path, first_layer)
        self.device = device
        self.model_dir = Path(getattr(model, "name_or_path", "") or ".")

    def _names(self) -> list[str]:
        return [
            f"{prefix}.{name}"
            for prefix, module in self.modules.items()
            for name, _ in [*module.named_parameters(), *module.named_buffers()]
        ]

    def can_restore(self) -> bool:
        """The model came from safetensors files that hold every tensor of the prefix."""
        try:
            checkpoint = SafetensorsCheckpoint(self.model_dir)
        except (ConfigError, OSError):  # not loaded from a safetensors directory: keep the prefix
            return False
        return all(checkpoint.key_for(name) is not None for name in self._names())

    def free(self) -> int:
        """Move the prefix to the meta device; returns the bytes released."""
        released = 0
        for module in self.modules.values():
            for tensor in [*module.parameters(), *module.buffers()]:
                assert not tensor.requires_grad, "a trainable parameter below the prefix cache's first layer"
                released += tensor.numel() * tensor.element_size()
            module.to("meta")
        logger.info(
            "prefix cache: %d frozen prefix modules freed (%.1f MiB); reloaded from %s after training",
            len(self.modules),
            released / 2**20,
            self.model_dir,
        )
        return released

    @torch.no_grad()
    def restore(self) -> None:
        """Allocate the prefix on the device again and read its tensors from the checkpoint."""
        checkpoint = SafetensorsCheckpoint(self.model_dir)
        for prefix, module in self.modules.items():
            module.to_empty(device=self.device)
            for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
                tensor.copy_(checkpoint.read(f"{prefix}.{name}").to(tensor.dtype))
        logger.info("prefix cache: frozen prefix restored from %s", self.model_dir)


def offload_prefix(model: nn.Module, cache, strategy) -> PrefixOffload | None:
    """Free the frozen prefix when this strategy and model allow it (see the module docstring), else warn."""
    if not getattr(strategy, "supports_prefix_offload", False):
        logger.warning(
            "train.prefix_cache_offload_prefix is ignored by %s: each rank keeps its shard of the frozen "
            "prefix (see docs/performance.md)",
            type(strategy).__name__,
        )
        return None
    offload = PrefixOffload(model, cache.layers_path, cache.first_layer, strategy.device)
    if not offload.can_restore():
        logger.warning(
            "train.prefix_cache_offload_prefix is ignored: the frozen prefix could not be reloaded from %s",
            offload.model_dir,
        )
        return None
    offload.free()
    return offload
