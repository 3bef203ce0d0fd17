"""Frozen-prefix activation cache: run the decoder layers below the first trainable one once per edit.

When every trainable parameter sits at layer >= k, the hidden states entering layer k are a pure function of
the base weights and the edit's tokens: they never change during training. A dedicated pass (no gradients)
computes them once per edit; every training pass then runs only layers k..L, the final norm, and the head at
the target positions (``locft_dist/losses.py``).

Partial forwards go through the model's own root forward (``inputs_embeds`` = cached hidden states) with the
decoder ``ModuleList`` temporarily narrowed to the layers that must run. Rotary embeddings, position ids and
the causal+padding mask are therefore built by the model exactly as in a full forward; FSDP2 gathers the
units a pass runs by their own hooks (the embedding, a unit of its own, is never called from the cache, so
never gathered), and ZeRO-3 gathers each module's parameters by its per-module hooks (it records the
module order of a pass to prefetch along it; a pass in another order invalidates that trace, which costs
prefetching, not exactness). A self-check on a few edits compares
the partial path with the full forward; an architecture whose forward does anything else with
``inputs_embeds`` (position embeddings added, scaling) fails it and falls back to the full forward.

Ownership is fixed for the whole run: edit ``i`` belongs to rank ``i % world_size``. Each rank caches only
the edits it owns and, in every global batch, runs exactly those; ranks pad with zero-weight passes so every
rank runs the same number of passes. The loss of a global batch is a sum of per-edit shares, so gradients are
those of the uncached path; the sampler's global order is untouched. The cache is rebuilt on every start
that has more than one pass per edit left, with a batching that depends only on (edits, rank, world size),
so such a resumed run is bitwise the same; with less left, filling would not pay and the passes run whole.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from locft_dist.batching import length_sorted_chunks
from locft_dist.config import TrainConfig
from locft_dist.edits.encode import EncodedExample, causal_inputs, collate, to_device
from locft_dist.locate import find_decoder_layers, layer_of_parameter
from locft_dist.logits import final_hidden, without_head
from locft_dist.losses import losses_from_hidden

logger = logging.getLogger(__name__)

SELF_CHECK_EDITS = 4
"""Edits the partial-forward self-check runs through both paths (it costs two forwards of these)."""


def first_trainable_layer(model: nn.Module) -> int | None:
    """Lowest decoder layer holding a trainable parameter; None when one sits outside the layers."""
    layout = find_decoder_layers(model)
    layers = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            layer = layer_of_parameter(_strip(name), layout)
            if layer is None:
                return None
            layers.append(layer)
    return min(layers) if layers else None


def _strip(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "").replace("_fsdp_wrapped_module.", "")


@contextlib.contextmanager
def only_layers(model: nn.Module, layers_path: str, start: int, stop: int) -> Iterator[None]:
    """Within the block, the model's decoder ModuleList holds only layers ``start..stop-1``."""
    parent_path, _, name = layers_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    full = parent._modules[name]
    parent._modules[name] = nn.ModuleList(list(full)[start:stop])
    try:
        yield
    finally:
        parent._modules[name] = full


def _reshard(model: nn.Module) -> None:
    """Free what a forward without backward left gathered: FSDP2's root unit; under ZeRO-3, the parameters
    prefetched along a recorded module order that the partial pass then left (their post-forward hooks
    never ran). ZeRO-3 itself notices the changed module order, drops its trace and records a new one."""
    for name in ("reshard", "empty_partition_cache"):  # FSDP2 module; DeepSpeed engine (a no-op below 3)
        release = getattr(model, name, None)
        if callable(release):
            release()
            return


SLAB_BYTES = 64 * 2**20
"""Host rows are packed into slabs of this size: one allocation per slab, not one per edit."""
_ALIGN = 16


class RowStore:
    """Where the cached rows live: on the device up to its budget, then packed into host slabs (pinned
    when the device is a GPU) up to the host budget, then in an unlinked spill file.

    Spilled rows are read back with ``pread`` into fresh buffers, not memory-mapped: the page cache holds
    the file, and it does not count toward the process's resident memory.
    """

    def __init__(
        self,
        device: torch.device,
        device_budget_bytes: int | None,
        host_budget_bytes: int | None,
        spill_dir: str | None,
    ) -> None:
        self.device = device
        self.device_budget_bytes = device_budget_bytes
        self.host_budget_bytes = host_budget_bytes
        self.spill_dir = spill_dir
        self.device_bytes = self.host_bytes = self.spill_bytes = 0
        self._on_device: dict[int, torch.Tensor] = {}
        self._where: dict[int, tuple[int, int, int]] = {}  # index -> (slab or -1: spilled, byte offset, rows)
        self._slabs: list[torch.Tensor] = []
        self._slab_used = 0
        self._spill = None
        self._dtype: torch.dtype | None = None
        self._width = self._itemsize = 0

    def __len__(self) -> int:
        return len(self._on_device) + len(self._where)

    def put(self, index: int, hidden: torch.Tensor) -> None:
        """Store a copy of ``hidden`` (shape ``[tokens, width]``) for edit ``index``."""
        self._dtype, self._width, self._itemsize = hidden.dtype, hidden.shape[-1], hidden.element_size()
        size = hidden.numel() * hidden.element_size()
        if self.device.type != "cpu" and (
            self.device_budget_bytes is None or self.device_bytes + size <= self.device_budget_bytes
        ):
            self._on_device[index] = hidden.clone()
            self.device_bytes += size
        elif self.host_budget_bytes is None or self.host_bytes + size <= self.host_budget_bytes:
            self._put_host(index, hidden, size)
        else:
            self._put_spill(index, hidden, size)

    def _put_host(self, index: int, hidden: torch.Tensor, size: int) -> None:
        if not self._slabs or self._slab_used + size > self._slabs[-1].numel():
            pinned = self.device.type == "cuda"
            self._slabs.append(torch.empty(max(SLAB_BYTES, size), dtype=torch.uint8, pin_memory=pinned))
            self._slab_used = 0
        start = self._slab_used
        self._slabs[-1][start : start + size].view(hidden.dtype).view(hidden.shape).copy_(hidden)
        self._where[index] = (len(self._slabs) - 1, start, hidden.shape[0])
        self._slab_used = start + size + (-size % _ALIGN)
        self.host_bytes += size

    def _put_spill(self, index: int, hidden: torch.Tensor, size: int) -> None:
        if self._spill is None:
            # open for the store's lifetime; unlinked at once, so the OS removes it when the process ends
            self._spill = tempfile.TemporaryFile(prefix="locft-prefix-cache-", dir=self.spill_dir)  # noqa: SIM115
            where = self.spill_dir or tempfile.gettempdir()
            logger.info("prefix cache: host budget reached, spilling further rows to a file in %s", where)
        data = hidden.detach().contiguous().cpu().view(torch.uint8).reshape(-1).numpy().tobytes()
        self._where[index] = (-1, self._spill.tell(), hidden.shape[0])
        self._spill.write(data)
        self.spill_bytes += size

    def seal(self) -> None:
        """Filling is over: flush the spill file so that reads see every row."""
        if self._spill is not None:
            self._spill.flush()

    def get(self, index: int) -> torch.Tensor:
        """Edit ``index``'s rows (on the device, in a host slab, or read from the spill file)."""
        if index in self._on_device:
            return self._on_device[index]
        slab, start, tokens = self._where[index]
        size = tokens * self._width * self._itemsize
        if slab >= 0:
            raw = self._slabs[slab][start : start + size]
        else:
            raw = torch.empty(size, dtype=torch.uint8)
            if os.preadv(self._spill.fileno(), [raw.numpy()], start) != size:
                raise OSError(f"prefix cache spill file is short at byte {start}")
        return raw.view(self._dtype).view(tokens, self._width)


class PrefixCache:
    """Hidden states entering layer ``first_layer`` for the edits this rank owns."""

    def __init__(
        self,
        model: nn.Module,
        first_layer: int,
        *,
        rank: int,
        world_size: int,
        device: torch.device,
        device_budget_bytes: int | None = None,
        host_budget_bytes: int | None = None,
        spill_dir: str | None = None,
    ) -> None:
        layout = find_decoder_layers(model)
        self.layers_path = layout.layers_path
        self.num_layers = layout.num_layers
        self.first_layer = first_layer
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.rows = RowStore(device, device_budget_bytes, host_budget_bytes, spill_dir)

    def summary(self) -> dict[str, float]:
        return {
            "first_layer": self.first_layer,
            "num_edits": len(self.rows),
            "device_mib": self.rows.device_bytes / 2**20,
            "host_mib": self.rows.host_bytes / 2**20,
            "spill_mib": self.rows.spill_bytes / 2**20,
        }

    def owner(self, index: int) -> int:
        return index % self.world_size

    def owned(self, num_edits: int) -> list[int]:
        return list(range(self.rank, num_edits, self.world_size))

    # -- filling ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def _prefix_hidden(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The input of layer ``first_layer`` (= output of the layer below), from the model's own forward."""
        captured: list[torch.Tensor] = []
        below = model.get_submodule(self.layers_path)[self.first_layer - 1]
        handle = below.register_forward_hook(
            lambda _m, _a, out: captured.append(out[0] if isinstance(out, tuple) else out)
        )
        try:
            with only_layers(model, self.layers_path, 0, self.first_layer), without_head(model):
                model(**causal_inputs(inputs), use_cache=False)
        finally:
            handle.remove()
        return captured[-1].detach()

    def fill(
        self, model: nn.Module, examples: Sequence[EncodedExample], pad_id: int, micro: int, check
    ) -> bool:
        """Compute the owned edits' hidden states; False (cache unusable) when the self-check fails.

        ``check(bad: bool) -> bool`` agrees on the self-check's verdict across ranks (an all-reduce).
        Every rank runs the same number of passes (shorter shares repeat their last chunk).
        """
        owned = self.owned(len(examples))
        lengths = [len(e.input_ids) for e in examples]
        # longest first: the device's memory pool grows once, to the largest activations, and the shorter
        # chunks reuse those blocks (shortest first would allocate anew at nearly every new length)
        ascending = length_sorted_chunks(owned, lengths, micro)
        chunks = ascending[::-1]
        num_chunks = math.ceil(math.ceil(len(examples) / self.world_size) / micro)
        probe = [examples[i] for i in ascending[0][:SELF_CHECK_EDITS]]
        if check(not self._self_check(model, probe, pad_id)):
            return False
        for position in range(num_chunks):
            chunk = chunks[min(position, len(chunks) - 1)]
            inputs = to_device(collate([examples[i] for i in chunk], pad_id), self.device)
            hidden = self._prefix_hidden(model, inputs)
            if position < len(chunks):
                for row, index in enumerate(chunk):
                    self.rows.put(index, hidden[row, : lengths[index]])
        self.rows.seal()
        _reshard(model)
        logger.info(
            "prefix cache: %d edits, layers 0..%d run once; %.1f MiB on %s, %.1f MiB in host memory, "
            "%.1f MiB spilled to disk",
            len(self.rows),
            self.first_layer - 1,
            self.rows.device_bytes / 2**20,
            self.device.type,
            self.rows.host_bytes / 2**20,
            self.rows.spill_bytes / 2**20,
        )
        return True

    @torch.no_grad()
    def _self_check(self, model: nn.Module, batch: list[EncodedExample], pad_id: int) -> bool:
        """The partial path reproduces the full forward's final hidden states on a few edits (run the full
        one first, so that FSDP2 initializes with the whole module tree). The output layer is a fixed map
        of these, so equal hidden states mean equal logits."""
        inputs = to_device(collate(batch, pad_id), self.device)
        full = final_hidden(model, **causal_inputs(inputs))
        partial = self._suffix_hidden(model, self._prefix_hidden(model, inputs), inputs)
        _reshard(model)
        real = inputs["attention_mask"].bool()
        diff = (full.float() - partial.float()).abs()[real].max().item()
        scale = max(1.0, full.float()[real].abs().max().item())
        tolerance = (1e-4 if full.dtype == torch.float32 else 2e-2) * scale
        if diff > tolerance:
            logger.warning(
                "prefix cache disabled: running only layers %d.. of %s differs from the full forward "
                "(max |hidden state diff| %.3g); training runs the full forward every pass",
                self.first_layer,
                type(model).__name__,
                diff,
            )
            return False
        return True

    # -- training passes -------------------------------------------------------------------------------

    def _suffix_hidden(
        self, model: nn.Module, hidden: torch.Tensor, inputs: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Final hidden states from the cached input of layer ``first_layer`` (the embedding is not run;
        right-padded rows need no attention mask, see ``causal_inputs``)."""
        with only_layers(model, self.layers_path, self.first_layer, self.num_layers):
            return final_hidden(model, inputs_embeds=hidden)

    def _batch_hidden(self, indices: Sequence[int], width: int) -> torch.Tensor:
        rows = [self.rows.get(i) for i in indices]
        out = torch.zeros(
            (len(rows), width, rows[0].shape[-1]), dtype=rows[0].dtype, device=self.device
        )  # padded positions are masked out of attention and loss
        for row, hidden in enumerate(rows):
            out[row, : hidden.shape[0]].copy_(hidden, non_blocking=True)
        return out

    def losses(
        self, model: nn.Module, indices: Sequence[int], examples: Sequence[EncodedExample], pad_id: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Each owned example's training loss, as the full forward gives it, from layer ``first_layer`` on."""
        inputs = to_device(collate([examples[i] for i in indices], pad_id), self.device)
        hidden = self._batch_hidden(indices, inputs["input_ids"].shape[1])
        return losses_from_hidden(model, self._suffix_hidden(model, hidden, inputs), inputs), inputs


DEVICE_FREE_FRACTION = 0.5
"""Default device budget: this fraction of the device memory free when the cache is filled (the rest is
left to the training passes' activations); rows beyond it go to host memory."""


def device_budget_bytes(device: torch.device, configured_gib: float | None) -> int | None:
    """Bytes of cached rows kept on ``device``: ``train.prefix_cache_device_gib`` when set, else a share of
    the memory free now (free on the device plus what PyTorch holds reserved but unused). None on CPU,
    where every row lives in host memory."""
    if device.type != "cuda":
        return None
    if configured_gib is not None:
        return int(configured_gib * 2**30)
    free, _ = torch.cuda.mem_get_info(device)
    unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(DEVICE_FREE_FRACTION * (free + unused))


def uses_fixed_ownership(strategy, cfg: TrainConfig) -> bool:
    """Whether edits are owned by rank ``i % world_size`` (the cache's layout). Decided by the config and
    the strategy only, not by whether this start builds the cache, so a resumed run splits every batch as
    the run before it did."""
    return cfg.prefix_cache and getattr(strategy, "supports_prefix_cache", True)


def build_prefix_cache(
    model: nn.Module,
    examples: Sequence[EncodedExample],
    strategy,
    cfg: TrainConfig,
    pad_id: int,
    *,
    remaining_passes: int,
) -> PrefixCache | None:
    """The filled cache, or None (with the reason logged) when it cannot or need not be used.

    ``remaining_passes``: edit passes the run still has to make (epochs left times edits, less what the
    current epoch consumed). Filling costs one prefix forward per edit and saves one per pass, so it pays
    only when more than one pass per edit remains; nothing is filled when no step remains (a resume at
    the end).
    """
    if not getattr(strategy, "supports_prefix_cache", True):
        name = type(strategy).__name__
        logger.warning("train.prefix_cache is ignored by %s: every pass runs the full forward", name)
        return None
    first = first_trainable_layer(model)
    if first is None or first == 0:
        logger.info("prefix cache off: trainable parameters at layer 0 or outside the decoder layers")
        return None
    if remaining_passes <= len(examples):
        logger.info(
            "prefix cache off: %d edit passes remain for %d edits, so every prefix would run about once "
            "anyway",
            remaining_passes,
            len(examples),
        )
        return None
    if len(examples) < strategy.world_size:
        logger.info("prefix cache off: fewer edits than ranks")
        return None
    host = cfg.prefix_cache_host_gib
    cache = PrefixCache(
        model,
        first,
        rank=strategy.rank,
        world_size=strategy.world_size,
        device=strategy.device,
        device_budget_bytes=device_budget_bytes(torch.device(strategy.device), cfg.prefix_cache_device_gib),
        host_budget_bytes=None if host is None else int(host * 2**30),
        spill_dir=cfg.prefix_cache_spill_dir,
    )

    def check(bad: bool) -> bool:
        flag = torch.tensor(float(bad), device=strategy.device)
        return bool(strategy.all_reduce_max(flag).item() > 0)

    micro = cfg.micro_batch_size or math.ceil(cfg.batch_size / strategy.world_size)
    return cache if cache.fill(model, examples, pad_id, micro, check) else None
