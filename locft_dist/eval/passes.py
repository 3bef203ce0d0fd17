"""The batched model passes behind the metrics: one forward per batch, logits only where they are read.

A batch of probes is laid out with each prompt left-padded to the batch's longest prompt and its answer
right after it (right-padded to the longest answer), with position ids counting real tokens only. One
forward then gives everything the metrics need up to generation:

* the teacher-forced argmax at each answer position: the output layer runs on those rows of the final
  hidden states only (``locft_dist.logits``), never on the whole ``tokens x vocabulary`` grid;
* the first greedy token: the prediction at the last prompt column, which the answer's tokens cannot see;
* the prompt's KV cache: the forward's cache minus the answer's columns, so greedy decoding goes on from
  the second token without re-running the prompt.

Batches are cut from the probes sorted by length (longest first, so padding stays small and the first
batch shows the peak memory). Under a sharded model every rank runs the same number of forwards: ranks
agree on the number of batches and on every decoding step, and a rank short of work runs idle forwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from locft_dist.edits.encode import EncodedExample
from locft_dist.eval.generate import (
    OneProcess,
    Ranks,
    accepts_position_ids,
    cache_keyword,
    decode,
    decode_pair,
    max_over_ranks,
    output_cache,
)
from locft_dist.logits import chunked_head_logits


@dataclass
class ProbeOutput:
    predicted: list[int]
    """Teacher-forced argmax at each answer position (predicting the answer's tokens)."""
    generated: list[int] | None
    """Greedy tokens after the prompt, up to the probe's limit and its first stop token (None: not run)."""
    other_generated: list[int] | None = None
    """Paired decoding: the other weights' greedy tokens on the same prompt (None: not paired)."""


@dataclass(frozen=True)
class Decoding:
    """Greedy decoding of a pass: per-example token limits, the tokens that stop a row, and optionally
    ``decided(example, tokens)``: whether an example's metrics can no longer change (it may stop)."""

    limits: Sequence[int]
    stop: torch.Tensor
    decided: Callable[[int, list[int]], bool] | None = None
    paired: Paired | None = None


@dataclass(frozen=True)
class Paired:
    """Examples whose generation is compared with another set of weights' (the locality probes against
    the unedited weights): both decode in step (``generate.decode_pair``) until ``decided(example,
    tokens, other_tokens)`` or both end. ``other_weights()`` is a context in which the model has them."""

    examples: frozenset[int]
    other_weights: Callable[[], AbstractContextManager[None]]
    decided: Callable[[int, list[int], list[int]], bool]


def model_device(model: nn.Module) -> torch.device:
    """Where inputs must go: HF models say so; other modules are asked through their first parameter."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the duration, then the caller's mode back, e.g. mid-training."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def batches(order: Sequence[int], batch_size: int, groups: Sequence[int] | None = None) -> list[list[int]]:
    """Consecutive chunks of ``order`` (indices already sorted by length, so padding stays small); with
    ``groups``, a chunk never spans two groups."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out: list[list[int]] = []
    for index in order:
        if not out or len(out[-1]) == batch_size or (groups and groups[out[-1][-1]] != groups[index]):
            out.append([])
        out[-1].append(index)
    return out


def length_order(examples: Sequence[EncodedExample], groups: Sequence[int] | None = None) -> list[int]:
    """By group (when given), then longest prompt first, then longest answer: rows that share a batch
    need little padding, and rows that decode for long (a group) share batches rather than each
    keeping a batch of finished rows waiting."""

    def key(i: int) -> tuple[int, int, int, int]:
        example = examples[i]
        return (groups[i] if groups else 0, -example.num_prompt_tokens, -example.num_target_tokens, i)

    return sorted(range(len(examples)), key=key)


@dataclass
class Layout:
    """A batch as model inputs: prompts end at column ``prompt_width``; answers follow."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prompt_width: int
    answer_lengths: list[int]

    def to(self, device: torch.device) -> Layout:
        return Layout(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.position_ids.to(device),
            self.prompt_width,
            self.answer_lengths,
        )

    def answer_columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, columns) whose outputs predict the answer tokens: the last prompt column onwards."""
        rows = [r for r, n in enumerate(self.answer_lengths) for _ in range(n)]
        cols = [self.prompt_width - 1 + j for n in self.answer_lengths for j in range(n)]
        return torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)


def layout(examples: Sequence[EncodedExample], pad_id: int) -> Layout:
    """Left-pad the prompts to a common end column, then the answers right-padded after it."""
    if not examples:
        raise ValueError("a batch needs at least one example")
    prompt_width = max(e.num_prompt_tokens for e in examples)
    answer_width = max(e.num_target_tokens for e in examples)
    width = prompt_width + answer_width
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        start = prompt_width - example.num_prompt_tokens
        end = prompt_width + example.num_target_tokens
        input_ids[row, start:end] = torch.tensor(example.input_ids, dtype=torch.long)
        attention_mask[row, start:end] = 1
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp_min(0)
    return Layout(
        input_ids, attention_mask, position_ids, prompt_width, [e.num_target_tokens for e in examples]
    )


def decoder_forward(model: nn.Module, **inputs: Any) -> tuple[torch.Tensor, Any]:
    """The model's own forward with the head at one position only; (final hidden states, outputs)."""
    captured: list[torch.Tensor] = []

    def keep(_module: nn.Module, _args: Any, output: Any) -> None:
        hidden = getattr(output, "last_hidden_state", None)
        captured.append(hidden if hidden is not None else output[0])

    decoder = getattr(model, "module", model).get_decoder()
    handle = decoder.register_forward_hook(keep)
    try:
        outputs = model(**inputs, logits_to_keep=1)
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"{type(model).__name__}'s forward did not run its decoder")
    return captured[-1], outputs


def prompt_cache(cache: Any, batch: Layout) -> Any:
    """The cache of the prompt columns alone (the answer's columns removed); None if it cannot be cut."""
    drop = batch.input_ids.shape[1] - batch.prompt_width
    if cache is None or drop == 0:
        return cache
    try:
        cache.crop(-drop)  # a negative length removes that many columns (transformers 4.x and 5.x alike)
    except (AttributeError, NotImplementedError, ValueError):
        return None
    return cache


class FullForward:
    """How a batch's final hidden states (and its prompt's cache) are computed: by the whole model.

    ``number`` is the batch's position in the pass (the same on every rank); ``has_work`` is False for a
    rank's idle batch. ``prefix.PrefixReuse`` replaces this to reuse the unedited pass's lower layers.
    """

    def start_pass(self, num_batches: int, device: torch.device) -> None:
        return None

    def forward(
        self, model: nn.Module, number: int, has_work: bool, batch: Layout, want_cache: bool
    ) -> tuple[torch.Tensor, Any]:
        kwargs: dict[str, Any] = {"attention_mask": batch.attention_mask, "use_cache": want_cache}
        if accepts_position_ids(model):
            kwargs["position_ids"] = batch.position_ids
        hidden, outputs = decoder_forward(model, input_ids=batch.input_ids, **kwargs)
        return hidden, prompt_cache(output_cache(outputs), batch) if want_cache else None


def agreed_head_logits(model: nn.Module, hidden: torch.Tensor, ranks: Ranks) -> list[torch.Tensor]:
    """``chunked_head_logits`` with the same number of head calls on every rank (ZeRO-3 gathers the head's
    weight in each call): a rank with fewer chunks adds one-row calls whose results it drops."""
    chunks = chunked_head_logits(model, hidden)
    needed = max_over_ranks(ranks, len(chunks), hidden.device)
    for _ in range(needed - len(chunks)):
        chunked_head_logits(model, hidden.new_zeros((1, hidden.shape[-1])))
    return chunks


def head_argmax(model: nn.Module, hidden: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """Argmax of the output layer on the rows of ``hidden`` (on CPU)."""
    return torch.cat([logits.argmax(dim=-1) for logits in agreed_head_logits(model, hidden, ranks)]).cpu()


def _per_row(decided: Callable[[int, list[int]], bool] | None, chunk: list[int]):
    if decided is None:
        return None
    return lambda row, tokens: decided(chunk[row], tokens)


@torch.no_grad()
def run_probes(
    model: nn.Module,
    examples: Sequence[EncodedExample],
    *,
    pad_id: int,
    batch_size: int,
    decoding: Decoding | None = None,
    ranks: Ranks | None = None,
    forward: FullForward | None = None,
    groups: Sequence[int] | None = None,
    progress: bool = False,
    desc: str = "probes",
    pool_stragglers: bool = True,
) -> list[ProbeOutput]:
    """Teacher-forced argmax (and, with ``decoding``, greedy tokens) of every example, in their order.

    Collective when ``ranks`` spans several processes: every rank must call it, with its own examples.
    Batches are cut from the examples sorted by ``groups`` (if given), then length. ``pool_stragglers``:
    a batch's last few rows still decoding are continued together with other batches' (``PARK_DIVISOR``).
    """
    ranks = ranks or OneProcess()
    forward = forward or FullForward()
    device = model_device(model)
    chunks = batches(length_order(examples, groups), batch_size, groups)
    num_batches = max_over_ranks(ranks, len(chunks), device)
    results: list[ProbeOutput | None] = [None] * len(examples)
    use_cache = decoding is not None and cache_keyword(model) is not None
    forward.start_pass(num_batches, device)
    parked_rows: list[int] = []
    stragglers: list[tuple[int, list[int]]] = []  # (example, tokens so far) of rows parked unfinished
    for number in tqdm(range(num_batches), desc=desc, disable=not progress):
        chunk = chunks[number] if number < len(chunks) else []
        # A rank whose share is done keeps the others company with a one-token batch (sharded models
        # need every rank in every forward); its results are dropped.
        rows_examples = [examples[i] for i in chunk] or [EncodedExample((pad_id, pad_id), 1)]
        batch = layout(rows_examples, pad_id).to(device)
        hidden, cache = forward.forward(model, number, bool(chunk), batch, use_cache)
        rows, cols = batch.answer_columns()
        argmax = head_argmax(model, hidden[rows.to(device), cols.to(device)], ranks)
        predicted = argmax.split(batch.answer_lengths)
        generated: list[list[int] | None] = [None] * len(chunk)
        other: list[list[int] | None] = [None] * len(chunk)
        if decoding is not None and _is_paired(decoding, chunk, ranks):
            assert decoding.paired is not None
            generated, other = _paired_generation(
                model,
                forward,
                decoding,
                decoding.paired,
                number,
                chunk,
                batch,
                predicted,
                cache,
                use_cache,
                ranks,
            )
        elif decoding is not None:
            prompt = slice(0, batch.prompt_width)
            out = decode(
                model,
                torch.stack([p[0] for p in predicted]).to(device) if chunk else None,
                cache=cache,
                prompt_ids=batch.input_ids[:, prompt],
                attention_mask=batch.attention_mask[:, prompt],
                limits=[decoding.limits[i] for i in chunk],
                stop=decoding.stop,
                pad_id=pad_id,
                ranks=ranks,
                device=device,
                decided=_per_row(decoding.decided, chunk),
                park_at=len(chunk) // PARK_DIVISOR if pool_stragglers else 0,
                parked=parked_rows,
            )
            generated = list(out)
            stragglers.extend((chunk[row], out[row]) for row in parked_rows)
            parked_rows.clear()
        if not chunk:
            continue
        for index, ids, gen, gen_other in zip(chunk, predicted, generated, other, strict=True):
            results[index] = ProbeOutput(ids.tolist(), gen, gen_other)
    if decoding is not None and pool_stragglers:
        for index, tokens in _continue_pooled(
            model, examples, stragglers, decoding, pad_id, batch_size, ranks
        ):
            results[index].generated = tokens  # type: ignore[union-attr]
    return results  # type: ignore[return-value]


PARK_DIVISOR = 8
"""A batch of at least this many rows parks its last rows still decoding once they are this fraction of
it or fewer: pooled with other batches' (``_continue_pooled``), they no longer pay a whole batch's steps."""


def _continue_pooled(
    model: nn.Module,
    examples: Sequence[EncodedExample],
    stragglers: Sequence[tuple[int, list[int]]],
    decoding: Decoding,
    pad_id: int,
    batch_size: int,
    ranks: Ranks,
) -> list[tuple[int, list[int]]]:
    """Greedy decoding of parked rows, pooled into full batches: each row's prompt and its tokens so far
    are one forward (the next token and the cache), then decoding goes on as before. Collective: the
    ranks agree on the number of pooled batches and a rank short of them runs idle ones."""
    device = model_device(model)
    chunks = [list(stragglers[i : i + batch_size]) for i in range(0, len(stragglers), batch_size)]
    done: list[tuple[int, list[int]]] = []
    use_cache = cache_keyword(model) is not None
    for number in range(max_over_ranks(ranks, len(chunks), device)):
        chunk = chunks[number] if number < len(chunks) else []
        contexts = [(*examples[i].input_ids[: examples[i].num_prompt_tokens], *t) for i, t in chunk]
        rows_examples = [EncodedExample(c, len(c)) for c in contexts]
        batch = layout(rows_examples or [EncodedExample((pad_id,), 1)], pad_id).to(device)
        hidden, cache = FullForward().forward(model, number, bool(chunk), batch, use_cache)
        following = head_argmax(model, hidden[:, -1], ranks)
        before = [t for _, t in chunk]

        def decided(row: int, tokens: list[int], before=before, chunk=chunk) -> bool:
            return decoding.decided is not None and decoding.decided(chunk[row][0], before[row] + tokens)

        out = decode(
            model,
            following.to(device) if chunk else None,
            cache=cache,
            prompt_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            limits=[decoding.limits[i] - len(t) for i, t in chunk],
            stop=decoding.stop,
            pad_id=pad_id,
            ranks=ranks,
            device=device,
            decided=decided,
        )
        done.extend((i, t + more) for (i, t), more in zip(chunk, out, strict=True))
    return done


def _is_paired(decoding: Decoding, chunk: list[int], ranks: Ranks) -> bool:
    """Whether this batch decodes beside the other weights (a batch is all paired or none)."""
    if decoding.paired is None or not chunk:
        return False
    flags = {i in decoding.paired.examples for i in chunk}
    if len(flags) > 1:
        raise ValueError("a batch mixes paired and unpaired examples: give them different groups")
    if flags == {True} and ranks.world_size > 1:
        raise ValueError("paired decoding runs in one process (the other weights are this process's)")
    return flags == {True}


def _paired_generation(
    model: nn.Module,
    forward: FullForward,
    decoding: Decoding,
    paired: Paired,
    number: int,
    chunk: list[int],
    batch: Layout,
    predicted: Sequence[torch.Tensor],
    cache: Any,
    use_cache: bool,
    ranks: Ranks,
) -> tuple[list[list[int] | None], list[list[int] | None]]:
    """The batch's prompts decoded by the model (from its prompt ``cache``) and, in step, by the model with
    the other weights (from their own prompt forward: its cache and first token)."""
    device = batch.input_ids.device
    with paired.other_weights():
        other_hidden, other_cache = forward.forward(model, number, True, batch, use_cache)
        other_first = head_argmax(model, other_hidden[:, batch.prompt_width - 1], ranks).to(device)
    prompt = slice(0, batch.prompt_width)
    ours, theirs = decode_pair(
        model,
        paired.other_weights,
        torch.stack([p[0] for p in predicted]).to(device),
        other_first,
        cache=cache,
        other_cache=other_cache,
        prompt_ids=batch.input_ids[:, prompt],
        attention_mask=batch.attention_mask[:, prompt],
        limits=[decoding.limits[i] for i in chunk],
        stop=decoding.stop,
        decided=lambda row, tokens, other_tokens: paired.decided(chunk[row], tokens, other_tokens),
    )
    return list(ours), list(theirs)
