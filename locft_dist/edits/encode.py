"""Conditional-likelihood encoding: prompt and target tokenized apart, joined as ids.

Tokenizing ``prompt + target`` as one string lets the tokenizer merge across the boundary, so the
loss mask drifts by a token for some prompts. Encoding the two parts separately and concatenating
the ids keeps the boundary exact; the loss covers the target tokens only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from locft_dist.errors import EncodingError

IGNORE_INDEX = -100

CHAT_TEMPLATES = ("none", "auto")
"""``edits.chat_template``: ``none`` (plain completion) | ``auto`` (the tokenizer's chat template: the
prompt becomes a user turn and the target the assistant's reply)."""


@dataclass(frozen=True)
class Encoding:
    """How (prompt, answer) pairs become token ids.

    Training, evaluation and augmentation all encode through one of these, and the delta records it
    (``locft.encoding``), so evaluating a delta probes exactly what the run trained.
    """

    target_prefix: str = " "
    append_eos: bool = True
    chat_template: str = "none"
    max_length: int | None = 256

    def __post_init__(self) -> None:
        if self.chat_template not in CHAT_TEMPLATES:
            raise ValueError(f"chat_template must be one of {CHAT_TEMPLATES}, got {self.chat_template!r}")

    @classmethod
    def from_config(cls, edits_cfg: Any) -> Encoding:
        """The encoding of a run's ``edits`` config section."""
        return cls(
            target_prefix=edits_cfg.target_prefix,
            append_eos=edits_cfg.append_eos,
            chat_template=edits_cfg.chat_template,
            max_length=edits_cfg.max_length,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Encoding:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown encoding keys {unknown}")
        return cls(**dict(data))

    def for_probes(self) -> Encoding:
        """Evaluation probes: the same rendering, no EOS after the answer."""
        return dataclasses.replace(self, append_eos=False)


@dataclass(frozen=True)
class EncodedExample:
    """Ids of prompt followed by target; the loss applies to positions ``>= num_prompt_tokens``.

    Augmented examples (``edits/augment.py``) may carry a loss ``weight`` and, for KL locality supervision,
    the unedited model's top-k distribution per target token (``soft_ids`` int64 and ``soft_probs`` float32,
    tensors of shape ``[num_target_tokens, k]``, often views into one flat store): the loss
    (``locft_dist/losses.py``) is then KL(unedited || model) instead of cross-entropy on the target ids.
    Equality compares the ids, prompt length and weight only.
    """

    input_ids: tuple[int, ...]
    num_prompt_tokens: int
    weight: float = 1.0
    soft_ids: torch.Tensor | None = field(default=None, compare=False)
    soft_probs: torch.Tensor | None = field(default=None, compare=False)

    @property
    def num_target_tokens(self) -> int:
        return len(self.input_ids) - self.num_prompt_tokens


def target_text(answer: str, prefix: str = " ") -> str:
    """The string the model must produce after the prompt (leading space unless already there)."""
    if prefix and answer.startswith(prefix):
        return answer
    return prefix + answer


def pad_token_id(tokenizer) -> int:
    """The model's pad id, falling back to EOS: the vocabulary is never resized for padding."""
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    if pad is None:
        raise EncodingError(
            "the tokenizer has neither a pad nor an EOS token; set one in tokenizer_config.json"
        )
    return int(pad)


def encode_pair(
    tokenizer,
    prompt: str,
    answer: str,
    *,
    target_prefix: str = " ",
    append_eos: bool = True,
    max_length: int | None = None,
    add_bos: bool = True,
) -> EncodedExample:
    """Encode one (prompt, answer) pair.

    The prompt gets the tokenizer's BOS when it normally adds one (``add_bos``); the target never does.
    If the sequence exceeds ``max_length`` the prompt is truncated from the left (its end is what the
    target conditions on); a target that alone does not fit is an error.
    """
    return encode_pairs(
        tokenizer,
        [prompt],
        [answer],
        target_prefix=target_prefix,
        append_eos=append_eos,
        max_length=max_length,
        add_bos=add_bos,
    )[0]


def encode_pairs(
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    target_prefix: str = " ",
    append_eos: bool = True,
    max_length: int | None = None,
    add_bos: bool = True,
) -> list[EncodedExample]:
    """``encode_pair`` for many pairs, tokenized in two batched calls (fast for 100K edits)."""
    if append_eos and tokenizer.eos_token_id is None:
        raise EncodingError("append_eos is set but the tokenizer has no EOS token")
    if not prompts:
        return []
    prompt_ids = tokenizer(list(prompts), add_special_tokens=add_bos)["input_ids"]
    targets = [target_text(a, target_prefix) for a in answers]
    target_ids = tokenizer(targets, add_special_tokens=False)["input_ids"]
    eos = [int(tokenizer.eos_token_id)] if append_eos else []
    bos = tokenizer.bos_token_id if add_bos else None
    return [
        _join(list(p), list(t) + eos, answer, max_length, bos)
        for p, t, answer in zip(prompt_ids, target_ids, answers, strict=True)
    ]


def _join(
    prompt_ids: list[int], target_ids: list[int], answer: str, max_length: int | None, bos: int | None
) -> EncodedExample:
    if not target_ids:
        raise EncodingError(f"target {answer!r} tokenizes to nothing")
    if max_length is not None and len(prompt_ids) + len(target_ids) > max_length:
        if len(target_ids) >= max_length:
            raise EncodingError(
                f"target {answer!r} is {len(target_ids)} tokens, which does not fit max_length={max_length} "
                "with at least one prompt token; raise edits.max_length"
            )
        keep = max_length - len(target_ids)
        if bos is not None and prompt_ids and prompt_ids[0] == bos and keep > 1:
            prompt_ids = [bos, *prompt_ids[len(prompt_ids) - keep + 1 :]]
        else:
            prompt_ids = prompt_ids[len(prompt_ids) - keep :]
    return EncodedExample(tuple(prompt_ids + target_ids), len(prompt_ids))


def collate(examples: Sequence[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its own longest sequence; labels are -100 outside the targets.

    Right padding keeps position ids equal to the unpadded sequence, so a padded batch computes the same
    logits at real positions as each example alone.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        ids = torch.tensor(example.input_ids, dtype=torch.long)
        n = len(example.input_ids)
        input_ids[row, :n] = ids
        attention_mask[row, :n] = 1
        labels[row, example.num_prompt_tokens : n] = ids[example.num_prompt_tokens :]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if any(e.weight != 1.0 for e in examples):
        batch["weights"] = torch.tensor([e.weight for e in examples], dtype=torch.float32)
    if any(e.soft_ids is not None for e in examples):
        batch.update(_collate_soft(examples, width))
    return batch


def _collate_soft(examples: Sequence[EncodedExample], width: int) -> dict[str, torch.Tensor]:
    """Top-k targets laid out like ``labels`` (at the target token's position); probs 0 elsewhere."""
    k = max(e.soft_ids.shape[1] for e in examples if e.soft_ids is not None)
    soft_ids = torch.zeros((len(examples), width, k), dtype=torch.long)
    soft_probs = torch.zeros((len(examples), width, k), dtype=torch.float32)
    is_soft = torch.zeros(len(examples), dtype=torch.bool)
    for row, example in enumerate(examples):
        if example.soft_ids is None or example.soft_probs is None:
            continue
        ids, probs = example.soft_ids, example.soft_probs
        if ids.shape[0] != example.num_target_tokens or ids.shape != probs.shape:
            raise ValueError("soft targets need one top-k row of ids and of probabilities per target token")
        is_soft[row] = True
        start, stop = example.num_prompt_tokens, len(example.input_ids)
        soft_ids[row, start:stop, : ids.shape[1]] = ids
        soft_probs[row, start:stop, : probs.shape[1]] = probs
    return {"soft_ids": soft_ids, "soft_probs": soft_probs, "is_soft": is_soft}
