"""A faithful re-statement of the LocFT authors' editing loop: the yardstick for ``locft edit``.

What it reproduces, on purpose, including the habits ``locft edit`` does differently:
- target string = " " + answer + EOS text, appended to the prompt *as a string* and tokenized together;
- left padding; the loss mask starts after (pad count of the full text + token count of the prompt alone),
  so it drifts when the tokenizer merges across the prompt/target boundary;
- per-edit mean target cross-entropy, averaged over the batch; Adam; the step is skipped when the batch loss
  is already < 0.01; stop when an epoch's mean loss is < 0.01; Python's ``random.shuffle`` each epoch;
- a full forward of the whole model for every batch of every epoch.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from locft_dist.edits import EditRequest


@dataclass
class ReferenceLoopResult:
    epoch_losses: list[float] = field(default_factory=list)
    num_steps: int = 0
    seconds: float = 0.0


def run_reference_loop(
    model: nn.Module,
    tokenizer,
    requests: Sequence[EditRequest],
    parameter_names: Sequence[str],
    *,
    lr: float = 5e-4,
    batch_size: int = 100,
    epochs: int = 25,
    threshold: float = 1e-2,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> ReferenceLoopResult:
    """Edit ``model`` in place by the authors' loop over the named parameters."""
    device = torch.device(device)
    model.to(device)
    rng = random.Random(seed)
    names = set(parameter_names)
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
    params = [p for n, p in model.named_parameters() if n in names]
    optimizer = torch.optim.Adam(params, lr=lr)
    pad_id = tokenizer.pad_token_id
    if pad_id is None or pad_id == tokenizer.eos_token_id:
        raise ValueError("the reference loop needs a pad token distinct from EOS (the authors add [PAD])")
    saved_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pairs = [
        (
            r.prompt,
            (r.target_new if r.target_new.startswith(" ") else " " + r.target_new) + tokenizer.eos_token,
        )
        for r in requests
    ]
    result = ReferenceLoopResult()
    start = time.perf_counter()
    try:
        for _ in range(epochs):
            rng.shuffle(pairs)
            total, count = 0.0, 0
            for begin in range(0, len(pairs), batch_size):
                batch = pairs[begin : begin + batch_size]
                prompts = tokenizer([p for p, _ in batch], return_tensors="pt", padding=True)
                full = tokenizer([p + t for p, t in batch], return_tensors="pt", padding=True).to(device)
                prompt_lens = (prompts["input_ids"] != pad_id).sum(dim=1)
                pad_lens = (full["input_ids"] == pad_id).sum(dim=1).cpu()
                starts = (prompt_lens + pad_lens).tolist()
                width = full["input_ids"].size(1)
                mask = torch.tensor([[j >= s for j in range(width)] for s in starts], device=device)[:, 1:]
                logits = model(**full).logits
                token_loss = nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                    full["input_ids"][:, 1:].reshape(-1),
                    reduction="none",
                ).view(len(batch), -1)
                loss = ((token_loss * mask).sum(1) / mask.sum(1)).mean()
                total += loss.item() * len(batch)
                count += len(batch)
                optimizer.zero_grad()
                if loss.item() >= threshold:
                    loss.backward()
                    optimizer.step()
                    result.num_steps += 1
            result.epoch_losses.append(total / count)
            if total / count < threshold:
                break
    finally:
        tokenizer.padding_side = saved_side
        for param in model.parameters():
            param.requires_grad_(False)
    result.seconds = time.perf_counter() - start
    return result
