"""Training losses from the final hidden states at target positions: the output layer never runs elsewhere.

A LocFT loss reads the logits of the few positions that predict a target token (an edit's answer, a
locality example's continuation). Computing full ``[batch, tokens, vocab]`` logits and upcasting them to
float32 costs, at a 128K-152K vocabulary, more FLOPs than the edited layer and gigabytes of activations per
micro-batch; here the model runs its decoder only (``logits.final_hidden``), the hidden states at target
positions are gathered, and the output layer is applied to those rows alone, in float32 only there.

When a micro-batch has more target rows than ``max_logits`` allows at once, the rows are processed in
chunks whose logits are recomputed in backward (activation checkpointing), so no more than one chunk of
logits is alive at a time.

The per-example loss is the mean over the example's target tokens (every edit weighs the same whatever its
length, as in the LocFT reference loop): cross-entropy on the target ids, or KL(p || model) for locality
examples that carry the unedited model's top-k distribution ``p``; times the example's weight.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from locft_dist.edits.encode import causal_inputs
from locft_dist.logits import final_hidden, head_logits, target_positions

MAX_LOGITS = 2**26
"""Logits (rows x vocabulary) computed at once in the loss: 256 MiB in float32; larger sets are chunked."""


def forward_losses(
    model: nn.Module, batch: Mapping[str, torch.Tensor], *, max_logits: int = MAX_LOGITS
) -> torch.Tensor:
    """Each example's training loss (shape ``[batch]``) from a full forward of ``batch``'s ids (right-padded,
    as ``collate`` makes them: no attention mask is needed, see ``causal_inputs``)."""
    hidden = final_hidden(model, **causal_inputs(batch))
    return losses_from_hidden(model, hidden, batch, max_logits=max_logits)


def losses_from_hidden(
    model: nn.Module,
    hidden: torch.Tensor,
    batch: Mapping[str, torch.Tensor],
    *,
    max_logits: int = MAX_LOGITS,
) -> torch.Tensor:
    """Each example's training loss from the final hidden states ``[batch, tokens, hidden]``."""
    labels = batch["labels"]
    num_examples = labels.shape[0]
    if "target_rows" in batch:  # listed by collate on the host: nothing here waits on the device
        rows, cols, targets = batch["target_rows"], batch["target_cols"], batch["target_ids"]
        counts = batch["target_counts"]
    else:
        rows, cols = target_positions(labels)
        targets = labels[rows, cols + 1]
        counts = torch.bincount(rows, minlength=num_examples)
    picked = hidden[rows, cols]
    soft = None
    if "is_soft" in batch:
        soft = (
            batch["soft_ids"][rows, cols + 1],
            batch["soft_probs"][rows, cols + 1],
            batch["is_soft"][rows],
        )
    vocab = model.get_output_embeddings().weight.shape[0]
    step = max(1, max_logits // max(vocab, 1))
    if len(rows) <= step:
        token_losses = _token_losses(model, picked, targets, soft)
    else:
        parts = []
        for start in range(0, len(rows), step):
            part = slice(start, start + step)
            part_soft = None if soft is None else tuple(t[part] for t in soft)
            args = (model, picked[part], targets[part], part_soft)
            if torch.is_grad_enabled():  # keep only this chunk's logits alive; recompute them in backward
                parts.append(checkpoint(_token_losses, *args, use_reentrant=False))
            else:
                parts.append(_token_losses(*args))
        token_losses = torch.cat(parts)
    sums = torch.zeros(num_examples, dtype=token_losses.dtype, device=token_losses.device)
    sums = sums.index_add(0, rows, token_losses)
    losses = sums / counts.clamp_min(1).to(sums.dtype)
    if "weights" in batch:
        losses = losses * batch["weights"].to(losses.device)
    return losses


def _token_losses(
    model: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    soft: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """Loss of each target row: CE on ``targets``, or KL to the stored top-k where the row is soft."""
    logits = head_logits(model, hidden).float()
    ce = F.cross_entropy(logits, targets, reduction="none")
    if soft is None:
        return ce
    soft_ids, soft_probs, is_soft = soft  # rows that are not soft take ce below (no device-side test)
    log_q = torch.log_softmax(logits, dim=-1).gather(-1, soft_ids)
    kl = (soft_probs * (torch.log(soft_probs.clamp_min(1e-12)) - log_q)).sum(-1)
    return torch.where(is_soft, kl, ce)
