"""Perplexity on held-out text, the output layer applied to real (unpadded) positions only."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from locft_dist.edits.encode import EncodedExample, pad_token_id
from locft_dist.eval.generate import OneProcess, Ranks, max_over_ranks
from locft_dist.eval.passes import (
    agreed_head_logits,
    batches,
    decoder_forward,
    eval_mode,
    layout,
    length_order,
    model_device,
)


@torch.no_grad()
def nll_sums(
    model: nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int, ranks: Ranks | None = None
) -> tuple[float, int]:
    """(summed NLL in float32, number of predicted tokens) over every token after each text's first,
    summed over ranks (text ``i`` is scored by rank ``i % world_size``)."""
    ranks = ranks or OneProcess()
    pad_id = pad_token_id(tokenizer)
    device = model_device(model)
    mine = [t for i, t in enumerate(texts) if i % ranks.world_size == ranks.rank]
    examples = [EncodedExample(tuple(tokenizer(t)["input_ids"]), 1) for t in mine]
    examples = [e for e in examples if len(e.input_ids) > 1]
    chunks = batches(length_order(examples), batch_size)
    num_batches = max_over_ranks(ranks, len(chunks), device)
    total, count = torch.zeros((), dtype=torch.float64), 0
    for number in range(num_batches):
        # one prompt token, the rest is "answer": the loss covers every token after the first
        batch_examples = [examples[i] for i in chunks[number]] if number < len(chunks) else None
        batch = layout(batch_examples or [EncodedExample((pad_id, pad_id), 1)], pad_id).to(device)
        hidden, _ = decoder_forward(
            model,
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        )
        rows, cols = batch.answer_columns()
        logits = torch.cat(agreed_head_logits(model, hidden[rows.to(device), cols.to(device)], ranks))
        if batch_examples is None:
            continue
        targets = batch.input_ids[rows.to(device), cols.to(device) + 1]
        nll = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
        total += nll.double().cpu()
        count += int(targets.numel())
    if ranks.world_size > 1:
        pair = ranks.all_reduce_sum(
            torch.tensor([float(total), float(count)], dtype=torch.float64, device=device)
        )
        return float(pair[0]), int(pair[1])
    return float(total), count


def perplexity_texts(
    model: nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int = 64, ranks=None
) -> float:
    """Token-level perplexity, exp(mean NLL), pooled over all texts (long texts weigh more)."""
    with eval_mode(model):
        total, count = nll_sums(model, tokenizer, texts, batch_size=batch_size, ranks=ranks)
    if count == 0:
        raise ValueError("perplexity needs at least one text of two or more tokens")
    return math.exp(total / count)
