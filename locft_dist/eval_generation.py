"""The batched model passes behind the metrics: teacher-forced argmax, greedy decoding, answer matching.

An own greedy loop rather than ``model.generate``: it ignores whatever sampling or repetition settings a
checkpoint's ``generation_config`` carries, works on any module whose forward returns ``.logits`` (wrapped
or fake models included), and passes explicit position ids so a left-padded row decodes exactly as it
would alone.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import string
from collections.abc import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from locft_dist.edits.encode import EncodedExample, collate

EXTRA_NEW_TOKENS = 3
"""Greedy decoding runs this many tokens past the answer's length so a too-long answer fails EM."""

STOP_STRINGS = ("\n", ".")
"""LocFT cuts a generation at its first newline or period before comparing it with the answer."""

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD-style)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answer: str) -> bool:
    """Whether two strings agree after ``normalize_answer``."""
    return normalize_answer(prediction) == normalize_answer(answer)


def cut_at_stop(text: str, stops: Sequence[str] = STOP_STRINGS) -> str:
    """The text up to (excluding) the first stop string.

    Like LocFT this also cuts answers that contain a period themselves ("St. Louis"); such targets can
    never match exactly, which is the reference definition's behaviour.
    """
    end = len(text)
    for stop in stops:
        index = text.find(stop)
        if index != -1:
            end = min(end, index)
    return text[:end]


def _accepts_position_ids(model: torch.nn.Module) -> bool:
    """HF causal LMs take ``position_ids``; a forward with ``**kwargs`` (wrappers) is given them too."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == "position_ids" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    pad_id: int,
    eos_id: int | None,
    device: torch.device | str = "cpu",
) -> list[list[int]]:
    """Greedy continuations of a batch of prompt ids (EOS and what follows it dropped).

    Prompts are left-padded so every row's next token is read at the last column; position ids count
    real tokens only. The KV cache is used when the model returns one; otherwise the whole sequence is
    re-run each step (slow but correct, e.g. for test doubles).
    """
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_generate needs at least one prompt token per row")
    batch = len(prompts)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    positions = (attention_mask.cumsum(dim=1) - 1).clamp_min(0)
    use_positions = _accepts_position_ids(model)

    all_ids, all_positions = input_ids, positions
    step_ids, step_positions = input_ids, positions
    past = None
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    new_tokens: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        kwargs = {"attention_mask": attention_mask, "use_cache": True}
        if use_positions:
            kwargs["position_ids"] = step_positions
        if past is not None:
            kwargs["past_key_values"] = past
        outputs = model(input_ids=step_ids, **kwargs)
        next_token = outputs.logits[:, -1, :].argmax(dim=-1)
        next_token = torch.where(finished, torch.full_like(next_token, pad_id), next_token)
        new_tokens.append(next_token)
        if eos_id is not None:
            finished |= next_token == eos_id
        if bool(finished.all()):
            break
        next_position = all_positions[:, -1:] + 1
        all_ids = torch.cat([all_ids, next_token[:, None]], dim=1)
        all_positions = torch.cat([all_positions, next_position], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        past = getattr(outputs, "past_key_values", None)
        if past is None:
            step_ids, step_positions = all_ids, all_positions
        else:
            step_ids, step_positions = next_token[:, None], next_position

    if not new_tokens:
        return [[] for _ in prompts]
    generated = torch.stack(new_tokens, dim=1).tolist()
    results = []
    for row in generated:
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id)]
        results.append(row)
    return results


def model_device(model: torch.nn.Module) -> torch.device:
    """Where inputs must go: HF models say so; other modules are asked through their first parameter."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def batches(order: Sequence[int], batch_size: int) -> list[list[int]]:
    """Consecutive chunks of ``order`` (indices already sorted by length, so padding stays small)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [list(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the duration, then the caller's mode back, e.g. mid-training."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def target_argmax(
    model, examples: Sequence[EncodedExample], *, pad_id: int, batch_size: int, progress: bool, desc: str
) -> list[list[int]]:
    """Argmax ids at each example's target positions (the logits one position earlier predict them).

    Examples are batched longest first to waste little on padding; right padding leaves the logits at
    real positions unchanged.
    """
    device = model_device(model)
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    results: list[list[int]] = [[] for _ in examples]
    for batch in tqdm(batches(order, batch_size), desc=desc, disable=not progress):
        inputs = collate([examples[i] for i in batch], pad_id)
        logits = model(
            input_ids=inputs["input_ids"].to(device), attention_mask=inputs["attention_mask"].to(device)
        ).logits
        predicted = logits[:, :-1, :].argmax(dim=-1).cpu()
        for row, index in enumerate(batch):
            example = examples[index]
            start, end = example.num_prompt_tokens - 1, len(example.input_ids) - 1
            results[index] = predicted[row, start:end].tolist()
    return results


def generate_texts(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[EncodedExample],
    *,
    max_new_tokens: int | None,
    pad_id: int,
    batch_size: int,
    progress: bool = False,
    desc: str = "generate",
) -> list[str]:
    """Greedy text after each example's prompt, cut at the stop strings, in the examples' order.

    Each probe gets its own token budget (``max_new_tokens``, or its target length plus
    ``EXTRA_NEW_TOKENS``); a batch decodes to its longest budget and each row is truncated to its own,
    so a probe's text does not depend on which other probes share its batch.
    """
    device = model_device(model)
    eos_id = tokenizer.eos_token_id
    order = sorted(range(len(examples)), key=lambda i: -examples[i].num_prompt_tokens)
    results = ["" for _ in examples]
    for batch in tqdm(batches(order, batch_size), desc=desc, disable=not progress):
        limits = [
            examples[i].num_target_tokens + EXTRA_NEW_TOKENS if max_new_tokens is None else max_new_tokens
            for i in batch
        ]
        prompts = [examples[i].input_ids[: examples[i].num_prompt_tokens] for i in batch]
        rows = greedy_generate(
            model, prompts, max_new_tokens=max(limits), pad_id=pad_id, eos_id=eos_id, device=device
        )
        for index, ids, limit in zip(batch, rows, limits, strict=True):
            results[index] = cut_at_stop(tokenizer.decode(ids[:limit], skip_special_tokens=True))
    return results
