"""Greedy decoding for evaluation: KV cache, stop as soon as every row has stopped, ranks in step.

An own loop rather than ``model.generate``: it ignores whatever sampling or repetition settings a
checkpoint's ``generation_config`` carries, continues from a cache that the teacher-forced forward already
filled, passes explicit position ids so a left-padded row decodes exactly as it would alone, and keeps
sharded ranks in step (FSDP2 and ZeRO-3 need every rank in every forward): the ranks agree after each step
whether any row anywhere is still decoding, and a rank with nothing left runs a one-token forward.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager as ContextManager
from typing import Any, Protocol

import torch
from torch import nn

from locft_dist.eval.metrics import STOP_STRINGS


class Ranks(Protocol):
    """What evaluation needs of a Strategy: its rank, world size and two reductions."""

    rank: int
    world_size: int

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor: ...


class OneProcess:
    """``Ranks`` of a single process: reductions are the identity."""

    rank = 0
    world_size = 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def any_rank(ranks: Ranks, flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on any rank (no communication in one process)."""
    if ranks.world_size == 1:
        return flag
    return bool(ranks.all_reduce_max(torch.tensor([int(flag)], device=device)).item())


def max_over_ranks(ranks: Ranks, value: int, device: torch.device) -> int:
    if ranks.world_size == 1:
        return value
    return int(ranks.all_reduce_max(torch.tensor([value], dtype=torch.long, device=device)).item())


def _forward_parameters(model: nn.Module) -> Mapping[str, inspect.Parameter]:
    inner = getattr(model, "module", model)  # a DeepSpeed engine forwards to its module
    try:
        return inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return {}


def cache_keyword(model: nn.Module) -> str | None:
    """The forward's KV-cache argument: ``cache`` (transformers >= 5.2x) or ``past_key_values`` (older)."""
    parameters = _forward_parameters(model)
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    return None


def accepts_position_ids(model: nn.Module) -> bool:
    """HF causal LMs take ``position_ids``; a forward with ``**kwargs`` (wrappers) is given them too."""
    parameters = _forward_parameters(model)
    if not parameters:
        return True
    return "position_ids" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


def output_cache(outputs: Any) -> Any:
    """The KV cache a forward returned (``cache`` or, on older transformers, ``past_key_values``)."""
    for name in ("cache", "past_key_values"):
        value = outputs.get(name) if isinstance(outputs, Mapping) else getattr(outputs, name, None)
        if value is not None:
            return value
    return None


def crop_filled_layers(cache: Any, drop: int) -> None:
    """Remove the last ``drop`` positions from every cache layer that holds any. A partial forward fills
    only the layers it ran; transformers 5.0-5.17 fail when asked to crop an empty layer (4.x skip them)."""
    if not hasattr(cache, "layers"):
        cache.crop(-drop)
        return
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.crop(-drop)


def stop_tokens(tokenizer, vocab_size: int, eos_ids: Sequence[int] = ()) -> torch.Tensor:
    """``[vocab_size]`` booleans: the tokens that end a generation (EOS, or any token whose text holds a
    stop string). Decoding stops there; the text itself is cut by ``cut_at_stop``, so this only decides
    when nothing more can change the result."""
    size = min(vocab_size, len(tokenizer))
    texts = tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=False)
    stop = torch.zeros(vocab_size, dtype=torch.bool)
    stop[:size] = torch.tensor([any(s in t for s in STOP_STRINGS) for t in texts], dtype=torch.bool)
    for eos in {tokenizer.eos_token_id, *eos_ids} - {None}:
        if 0 <= int(eos) < vocab_size:
            stop[int(eos)] = True
    return stop


def model_eos_ids(model: nn.Module) -> list[int]:
    """EOS ids the model's generation config names (some chat models end turns with several)."""
    config = getattr(getattr(model, "module", model), "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _idle_forward(model: nn.Module, pad_id: int, device: torch.device) -> None:
    """A one-token forward, so that a rank with nothing to decode joins the others' collectives."""
    ids = torch.full((1, 1), pad_id, dtype=torch.long, device=device)
    model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, logits_to_keep=1)


class _Stream:
    """One batch's greedy decoding: each row's tokens so far, and the live rows' inputs and KV cache.

    Ended rows leave the batch (and the cache) as soon as a tenth of it has ended, so a step costs what
    its live rows cost.
    """

    def __init__(
        self,
        model: nn.Module,
        first: torch.Tensor,
        cache: Any,
        prompt_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> None:
        self.out = [[token] for token in first.tolist()]
        self.rows = list(range(len(self.out)))  # batch position -> original row (-1: ended, not yet dropped)
        self.mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        self.all_ids = torch.cat([prompt_ids, first[:, None]], dim=1)
        self.step_ids = first[:, None]
        self.positions = attention_mask.sum(dim=1, keepdim=True)  # the first token: at the prompt's length
        self.keyword, self.use_positions = cache_keyword(model), accepts_position_ids(model)
        self.cache = cache if self.keyword is not None else None

    def retire(self, ended: Callable[[int], bool]) -> None:
        """Mark the live rows for which ``ended(row)`` holds as ended."""
        self.rows = [r if r >= 0 and not ended(r) else -1 for r in self.rows]

    def has_live(self) -> bool:
        return any(r >= 0 for r in self.rows)

    def step(self, model: nn.Module) -> None:
        """One greedy token for every live row."""
        live = [i for i, r in enumerate(self.rows) if r >= 0]
        if len(live) <= 0.9 * len(self.rows):  # drop the ended rows from the batch and the cache
            index = torch.tensor(live, device=self.mask.device)
            self.rows = [self.rows[i] for i in live]
            self.mask, self.all_ids, self.step_ids, self.positions = (
                t[index] for t in (self.mask, self.all_ids, self.step_ids, self.positions)
            )
            if self.cache is not None:
                self.cache.batch_select_indices(index)
        kwargs: dict[str, Any] = {
            "attention_mask": self.mask,
            "use_cache": self.cache is not None,
            "logits_to_keep": 1,
        }
        if self.cache is not None:
            kwargs[self.keyword] = self.cache
        else:
            self.step_ids = self.all_ids
            self.positions = (self.mask.cumsum(dim=1) - 1).clamp_min(0)
        if self.use_positions:
            kwargs["position_ids"] = self.positions
        token = model(input_ids=self.step_ids, **kwargs).logits[:, -1, :].argmax(dim=-1)
        for position, value in enumerate(token.tolist()):
            if self.rows[position] >= 0:
                self.out[self.rows[position]].append(value)
        self.all_ids = torch.cat([self.all_ids, token[:, None]], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self.step_ids, self.positions = token[:, None], self.positions[:, -1:] + 1


def _ends_at(stop: torch.Tensor, limits: Sequence[int]) -> Callable[[list[int], int], bool]:
    is_stop = stop.tolist()
    return lambda tokens, row: is_stop[tokens[-1]] or len(tokens) >= limits[row]


@torch.no_grad()
def decode(
    model: nn.Module,
    first: torch.Tensor | None,
    *,
    cache: Any,
    prompt_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    limits: Sequence[int],
    stop: torch.Tensor,
    pad_id: int,
    ranks: Ranks,
    device: torch.device,
    decided: Callable[[int, list[int]], bool] | None = None,
    park_at: int = 0,
    parked: list[int] | None = None,
) -> list[list[int]]:
    """Continue greedy decoding after ``first`` (the token each row predicted after its left-padded
    prompt ``prompt_ids``/``attention_mask``), reusing ``cache`` (the prompt's KV cache; None: re-run the
    whole sequence each step). Row ``r`` ends at a stop token, after ``limits[r]`` tokens, or once
    ``decided(r, tokens)`` says its result cannot change any more; the result is each row's tokens.

    ``park_at``: once no more than this many rows are still decoding, they stop here unfinished and are
    appended to ``parked`` (a few long rows would otherwise keep a whole batch's steps going; the caller
    continues them pooled with other batches' rows). ``first`` is None on a rank with no batch here: it
    joins each step idly.
    """
    if first is None:
        while any_rank(ranks, False, device):
            _idle_forward(model, pad_id, device)
        return []
    assert prompt_ids is not None and attention_mask is not None
    stream = _Stream(model, first, cache, prompt_ids, attention_mask)
    at_end = _ends_at(stop, limits)

    def ended(row: int) -> bool:
        tokens = stream.out[row]
        return at_end(tokens, row) or (decided is not None and decided(row, tokens))

    stream.retire(ended)
    while True:
        live_rows = [r for r in stream.rows if r >= 0]
        if live_rows and len(live_rows) <= park_at and parked is not None:
            parked.extend(live_rows)
            stream.retire(lambda _row: True)
        live = bool(live_rows) and stream.has_live()
        if not any_rank(ranks, live, device):
            break
        if not live:
            _idle_forward(model, pad_id, device)
            continue
        stream.step(model)
        stream.retire(ended)
    return stream.out


@torch.no_grad()
def decode_pair(
    model: nn.Module,
    other_weights: Callable[[], ContextManager[None]],
    first: torch.Tensor,
    other_first: torch.Tensor,
    *,
    cache: Any,
    other_cache: Any,
    prompt_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    limits: Sequence[int],
    stop: torch.Tensor,
    decided: Callable[[int, list[int], list[int]], bool],
) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy decoding of the same prompts by two models in step: ``model`` as it is, and ``model``
    inside ``other_weights()`` (e.g. the unedited weights swapped in), each from its own first tokens
    and prompt cache. A row stops on each side at a stop token or its limit, and on both sides once
    ``decided(row, tokens, other_tokens)`` says comparing the two can no longer change: where the two
    part early, neither decodes to its end. One process only (the other weights are this process's)."""
    ours = _Stream(model, first, cache, prompt_ids, attention_mask)
    theirs = _Stream(model, other_first, other_cache, prompt_ids, attention_mask)
    at_end = _ends_at(stop, limits)
    settled: set[int] = set()

    def retire() -> None:
        for row in range(len(ours.out)):
            if row not in settled and decided(row, ours.out[row], theirs.out[row]):
                settled.add(row)
        ours.retire(lambda row: row in settled or at_end(ours.out[row], row))
        theirs.retire(lambda row: row in settled or at_end(theirs.out[row], row))

    retire()
    while ours.has_live() or theirs.has_live():
        if ours.has_live():
            ours.step(model)
        if theirs.has_live():
            with other_weights():
                theirs.step(model)
        retire()
    return ours.out, theirs.out


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    pad_id: int,
    stop: torch.Tensor,
    device: torch.device | str = "cpu",
) -> list[list[int]]:
    """Greedy continuations of a batch of prompt ids, up to ``max_new_tokens`` or the first stop token
    (kept in the result). Prompts are left-padded; position ids count real tokens only."""
    if not prompts or max_new_tokens < 1:
        return [[] for _ in prompts]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_generate needs at least one prompt token per row")
    device = torch.device(device)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    kwargs: dict[str, Any] = {"attention_mask": attention_mask, "use_cache": True, "logits_to_keep": 1}
    if accepts_position_ids(model):
        kwargs["position_ids"] = (attention_mask.cumsum(dim=1) - 1).clamp_min(0)
    outputs = model(input_ids=input_ids, **kwargs)
    return decode(
        model,
        outputs.logits[:, -1, :].argmax(dim=-1),
        cache=output_cache(outputs) if cache_keyword(model) else None,
        prompt_ids=input_ids,
        attention_mask=attention_mask,
        limits=[max_new_tokens] * len(prompts),
        stop=stop,
        pad_id=pad_id,
        ranks=OneProcess(),
        device=device,
    )
