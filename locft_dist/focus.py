"""The focus phase (``train.focus_epochs``): after the breadth-first epochs, more epochs over only the
examples whose loss is still above ``train.focus_loss``.

The breadth-first epochs end on the *mean* loss; a few edits can stay unlearned under a low mean (on
SmolLM2's subject rows, an edit with one row of its own learns slowest). A focus epoch gives those examples
the steps the learned ones no longer need, at a fraction of a full epoch's cost. Its set is measured at the
epoch's start over every example with the current weights (no gradient), so an example that later steps push
back above the threshold is trained again (on CF 500 with subject rows, measuring only the previous set left
218 examples that had left it back above). The set and the position in it are part of the checkpoint, so a
resumed run repeats the same batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from locft_dist.batching import rank_chunks
from locft_dist.edits.encode import EncodedExample, collate, to_device
from locft_dist.losses import forward_losses
from locft_dist.parallel.base import Strategy
from locft_dist.sampler import labelled_generator


def focus_order(indices: Sequence[int], seed: int, focus_epoch: int) -> list[int]:
    """The examples of focus epoch ``focus_epoch`` in their seeded order (a permutation of ``indices``)."""
    generator = labelled_generator(f"locft-focus:{seed}:{focus_epoch}")
    return [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]


@torch.no_grad()
def measure_losses(
    model: nn.Module,
    examples: Sequence[EncodedExample],
    candidates: Sequence[int],
    strategy: Strategy,
    pad_id: int,
    *,
    batch_size: int,
    lengths: Sequence[int],
    cache=None,
    modulo_owner: bool = False,
    max_tokens: int | None = None,
    pass_cost: int | None = None,
    micro_batch_size: int | None = None,
    progress: bool = False,
) -> list[float]:
    """Each candidate's training loss with the current weights, split over the ranks as training splits a
    batch (every rank runs the same number of passes) and summed, so every rank gets every value."""
    position = {index: j for j, index in enumerate(candidates)}
    values = torch.zeros(len(candidates), dtype=torch.float64, device=strategy.device)
    starts = range(0, len(candidates), batch_size)
    for start in tqdm(starts, desc="focus: measuring", unit="batch", disable=not progress, leave=False):
        batch = list(candidates[start : start + batch_size])
        chunks = rank_chunks(
            batch,
            strategy.rank,
            strategy.world_size,
            micro_batch_size,
            lengths,
            modulo_owner=modulo_owner,
            max_tokens=max_tokens,
            pass_cost=pass_cost,
        )
        for chunk, weight in chunks:
            if cache is not None:
                per_example, _ = cache.losses(model, chunk, examples, pad_id)
            else:
                per_example = forward_losses(
                    model, to_device(collate([examples[i] for i in chunk], pad_id), strategy.device)
                )
            if weight:  # a zero-weight pass only keeps the ranks' collectives in step
                rows = torch.tensor([position[i] for i in chunk], device=values.device)
                values[rows] = per_example.detach().double()
    return strategy.all_reduce_sum(values).tolist()


def above(candidates: Sequence[int], losses: Sequence[float], threshold: float) -> list[int]:
    """The candidates whose loss is above ``threshold``, in their given order."""
    return [index for index, loss in zip(candidates, losses, strict=True) if loss > threshold]
