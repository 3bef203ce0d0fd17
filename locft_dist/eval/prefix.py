"""Reuse of the frozen prefix between the unedited and the edited model's passes over the same probes.

Editing changes layers ``k`` and above only, so on every probe the layers below ``k`` compute the same
thing before and after editing. The unedited pass records, per batch, the hidden states entering layer
``k`` (and, when generating, the keys and values of layers ``0..k-1`` over the prompt columns); the edited
pass runs layers ``k..L`` from those states (teacher forcing, first token, and the prompt's cache for
layers ``k..L``) and completes the cache with the recorded lower layers, then decodes with the whole
model as usual. Recording stops at ``budget_bytes`` of host memory; later batches run the whole model.

The partial forward is the model's own forward with the decoder's ``ModuleList`` narrowed to layers
``k..L`` and ``inputs_embeds`` = the recorded states (as the training prefix cache does), so masks and
rotary positions are built exactly as in a full forward, and FSDP2/ZeRO-3 hooks gather what it runs. A
self-check on the first batch compares it with the full forward; an architecture that does more with
``inputs_embeds`` (scaling, position embeddings) fails it and keeps the full forward.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from locft_dist.errors import LocateError
from locft_dist.eval.generate import Ranks, any_rank, crop_filled_layers, output_cache
from locft_dist.eval.passes import FullForward, Layout, decoder_forward
from locft_dist.locate import find_decoder_layers
from locft_dist.prefix_cache import first_trainable_layer, only_layers

logger = logging.getLogger(__name__)


HOST_AVAILABLE_FRACTION = 0.25
"""Default recording budget: this share of the host memory available when the unedited pass starts."""


def available_host_bytes() -> int | None:
    """Host memory the kernel could give this process now (``MemAvailable``); None where unknown."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def reuse_budget_bytes(configured_gib: float | None) -> int:
    """``eval.prefix_reuse_gib`` in bytes; unset, a share of the available host memory split over the
    node's ranks (``LOCAL_WORLD_SIZE``), since every rank records its own probes in host memory."""
    if configured_gib is not None:
        return int(configured_gib * 2**30)
    available = available_host_bytes()
    if available is None:
        return 2**30
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return int(HOST_AVAILABLE_FRACTION * available / local_ranks)


def _layer_kv(cache: Any, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    layers = getattr(cache, "layers", None)  # the per-layer cache layout of current transformers
    if layers is None or index >= len(layers) or getattr(layers[index], "keys", None) is None:
        return None
    return layers[index].keys, layers[index].values


Record = tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]] | None]


class PrefixReuse(FullForward):
    """Records during the unedited model's pass; call ``replay()`` before the edited model's pass."""

    def __init__(self, model: nn.Module, first_layer: int, ranks: Ranks, *, budget_bytes: int) -> None:
        inner = getattr(model, "module", model)
        layout = find_decoder_layers(inner)
        self.layers_path, self.num_layers = layout.layers_path, layout.num_layers
        self.hidden_size = int(inner.config.hidden_size)
        self.first_layer = first_layer
        self.ranks = ranks
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self.recording = True
        self.usable: list[bool] = []
        self._records: dict[int, Record] = {}
        self._checked = False

    @classmethod
    def for_model(cls, model: nn.Module, ranks: Ranks, budget_bytes: int) -> PrefixReuse | None:
        """A recorder for the model's frozen prefix, or None when there is none to reuse."""
        if budget_bytes <= 0:
            return None
        try:
            first = first_trainable_layer(getattr(model, "module", model))
        except LocateError:  # no decoder layers to tell
            return None
        if not first:  # trainable parameters at layer 0 or outside the decoder layers
            return None
        return cls(model, first, ranks, budget_bytes=budget_bytes)

    @property
    def num_recorded(self) -> int:
        return len(self._records)

    def start_pass(self, num_batches: int, device: torch.device) -> None:
        if self.recording:
            return
        # replay a batch only where every rank recorded its share of it (idle shares need no record)
        missing = torch.tensor(
            [int(i not in self._records and i < self._num_own) for i in range(num_batches)]
        )
        if self.ranks.world_size > 1:
            missing = self.ranks.all_reduce_max(missing.to(device)).cpu()
        self.usable = [not bool(m) for m in missing.tolist()]
        logger.info(
            "evaluation reuses layers 0..%d of the unedited pass for %d of %d batches (%.1f MiB)",
            self.first_layer - 1,
            sum(self.usable),
            len(self.usable),
            self.used_bytes / 2**20,
        )

    def replay(self) -> None:
        """The unedited pass is over: the next pass (the edited model's) replays the records."""
        self.recording = False

    def forward(self, model: nn.Module, number: int, has_work: bool, batch: Layout, want_cache: bool):
        if self.recording:
            return self._record_forward(model, number, has_work, batch, want_cache)
        if not (number < len(self.usable) and self.usable[number]):
            return super().forward(model, number, has_work, batch, want_cache)
        device = batch.input_ids.device
        if not has_work:  # idle: the same partial forward as the ranks with work, on a dummy row
            dtype = next(getattr(model, "module", model).parameters()).dtype
            entering = torch.zeros(
                (1, batch.input_ids.shape[1], self.hidden_size), dtype=dtype, device=device
            )
            return self._partial(model, batch, entering, use_cache=False)[0], None
        entering, lower = self._records[number]
        hidden, outputs = self._partial(model, batch, entering.to(device), use_cache=want_cache)
        if not want_cache:
            return hidden, None
        cache = output_cache(outputs)
        drop = batch.input_ids.shape[1] - batch.prompt_width
        if drop:
            crop_filled_layers(cache, drop)  # the layers below the first are filled from the records next
        for index, (keys, values) in enumerate(lower or []):
            cache.update(keys.to(device), values.to(device), index)
        return hidden, cache

    # -- recording --------------------------------------------------------------------------------------

    _num_own = 0

    def _record_forward(self, model: nn.Module, number: int, has_work: bool, batch: Layout, want_cache: bool):
        captured: list[torch.Tensor] = []
        below = getattr(model, "module", model).get_submodule(self.layers_path)[self.first_layer - 1]
        handle = below.register_forward_hook(
            lambda _m, _a, out: captured.append(out[0] if isinstance(out, tuple) else out)
        )
        try:
            hidden, cache = super().forward(model, number, has_work, batch, want_cache)
        finally:
            handle.remove()
        entering = captured[-1].detach()
        if not self._checked:  # every rank runs batch 0 (idle if it has none): agree on the verdict
            self._checked = True
            if any_rank(self.ranks, not self._matches(model, batch, entering, hidden), hidden.device):
                self.budget_bytes = 0
        if has_work:
            self._num_own = number + 1
            self._record(number, entering, cache, want_cache)
        return hidden, cache

    def _record(self, number: int, entering: torch.Tensor, cache: Any, want_cache: bool) -> None:
        lower = None
        size = entering.numel() * entering.element_size()
        if want_cache:
            lower = [_layer_kv(cache, i) for i in range(self.first_layer)]
            if any(kv is None for kv in lower):
                return  # no per-layer tensors to complete a cache with: the full forward stays
            size += sum(2 * k.numel() * k.element_size() for k, _ in lower)
        if self.used_bytes + size > self.budget_bytes:
            return
        pin = entering.device.type == "cuda"

        def host(t: torch.Tensor) -> torch.Tensor:
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=pin).copy_(t)

        self._records[number] = (host(entering), [(host(k), host(v)) for k, v in lower] if lower else None)
        self.used_bytes += size

    @torch.no_grad()
    def _matches(self, model: nn.Module, batch: Layout, entering: torch.Tensor, full: torch.Tensor) -> bool:
        partial = self._partial(model, batch, entering, use_cache=False)[0]
        real = batch.attention_mask.bool()
        diff = (full.float() - partial.float()).abs()[real].max().item()
        scale = max(1.0, full.float()[real].abs().max().item())
        ok = diff <= (1e-4 if full.dtype == torch.float32 else 2e-2) * scale
        if not ok:
            logger.warning(
                "evaluation prefix reuse off: running layers %d.. of %s alone differs from the full forward "
                "(max |diff| %.3g)",
                self.first_layer,
                type(model).__name__,
                diff,
            )
        return ok

    def _partial(self, model: nn.Module, batch: Layout, entering: torch.Tensor, use_cache: bool):
        inner = getattr(model, "module", model)
        with only_layers(inner, self.layers_path, self.first_layer, self.num_layers):
            return decoder_forward(
                model,
                inputs_embeds=entering,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=use_cache,
            )
