"""Logits only where they are needed: the output layer applied to chosen positions, not to every token.

The output layer of a 128K-152K vocabulary is the largest matrix a late-layer edit runs (28M of the 31.5M
parameters after SmolLM2's last layer), yet the loss and the metrics read it at a few target positions.
``final_hidden`` runs the model's own forward (so masks, rotary positions and any wrapping, FSDP2 or
ZeRO-3, behave exactly as in a full forward) with the output layer replaced by a stand-in for the
duration, and hands back the final hidden states: the head's weight is not read (nor all-gathered, when it
is a sharded unit of its own) by that forward. ``head_logits`` applies the output layer, with the model's
own post-processing, to the rows the caller picked.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from locft_dist.edits.encode import IGNORE_INDEX


def _decoder(model: nn.Module) -> nn.Module:
    """The base model whose output is the final (normalized) hidden state (``model.model`` for Llama)."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None or decoder is model:
        raise ValueError(
            f"{type(model).__name__} exposes no decoder (get_decoder()) to read hidden states from"
        )
    return decoder


class _NoLogits(nn.Module):
    """Stands in for the output layer: zero-width "logits", a fresh tensor (not a view of the hidden
    states, which FSDP2's output hooks would warn about)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.new_empty((*hidden.shape[:-1], 0))


@contextlib.contextmanager
def without_head(model: nn.Module) -> Iterator[None]:
    """Within the block, the model's output layer is skipped: a forward computes no logits."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (get_output_embeddings())")
    path = next((name for name, module in model.named_modules() if module is head), None)
    assert path, "the output layer is a submodule of the model"
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    parent._modules[name] = _NoLogits()
    try:
        yield
    finally:
        parent._modules[name] = head


def final_hidden(model: nn.Module, **inputs: Any) -> torch.Tensor:
    """Final hidden states ``[batch, tokens, hidden]`` of a causal LM forward, after the final norm.

    The forward is the model's own (``inputs`` as for ``model(...)``: ``input_ids`` or ``inputs_embeds``,
    ``attention_mask``, ...), with the output layer skipped (``without_head``).
    """
    captured: list[torch.Tensor] = []

    def keep(_module: nn.Module, _args: Any, output: Any) -> None:
        hidden = getattr(output, "last_hidden_state", None)
        captured.append(hidden if hidden is not None else output[0])

    extra = {"logits_to_keep": 1} if _takes_logits_to_keep(model) else {}
    handle = _decoder(model).register_forward_hook(keep)
    try:
        with without_head(model):
            model(**inputs, use_cache=False, **extra)
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"{type(model).__name__}'s forward did not run its decoder")
    return captured[-1]


def _takes_logits_to_keep(model: nn.Module) -> bool:
    forward = getattr(model, "module", model).forward  # a DeepSpeed engine wraps the model as .module
    return "logits_to_keep" in inspect.signature(forward).parameters


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The output layer on ``hidden`` (any leading shape), with the post-processing some architectures
    apply after it (Gemma's final soft-capping, Cohere's logit scale)."""
    logits = model.get_output_embeddings()(hidden)
    config = getattr(model, "config", None)
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def target_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) of the positions whose logits predict a target token (the token one to the right)."""
    rows, cols = torch.nonzero(labels[:, 1:] != IGNORE_INDEX, as_tuple=True)
    return rows, cols


def chunked_head_logits(
    model: nn.Module, hidden: torch.Tensor, *, max_elements: int = 2**28
) -> list[torch.Tensor]:
    """``head_logits`` over the rows of ``hidden`` (``[rows, hidden]``) in chunks of at most
    ``max_elements`` logits each, so a large batch never holds rows x vocabulary logits at once."""
    vocab = model.get_output_embeddings().weight.shape[0]
    rows_per_chunk = max(1, max_elements // max(vocab, 1))
    return [
        head_logits(model, hidden[start : start + rows_per_chunk])
        for start in range(0, hidden.shape[0], rows_per_chunk)
    ] or [hidden.new_zeros((0, vocab))]
