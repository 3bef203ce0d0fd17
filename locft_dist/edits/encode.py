"""Conditional-likelihood encoding: (prompt, answer) pairs as prompt ids followed by target ids.

The prompt ids are the prompt's own ids (what a user's prompt tokenizes to, BOS included when the tokenizer
adds one), so training, evaluation and generation see the same context; the loss covers the target ids
only. The target ids are what the tokenizer gives for the answer *in context*: ``prompt + target`` is
tokenized whole and, when the prompt's ids are a prefix of that, the rest are the target's ids. Tokenizing
``" " + answer`` alone is not the same on SentencePiece-style (Metaspace) vocabularies, which turn it into
a lone ``"▁"`` followed by ``"▁Paris"``: a token pair the model never sees in running text.

When a merge crosses the boundary (a prompt ending in a space, digits split in groups), the prompt's ids
still stand and the target is tokenized as a fresh segment: after a special token, which every tokenizer
splits on and which ends any merge, so no prefix space is invented and ``decode(ids) == prompt + target``.

``Encoding.chat_template=auto`` renders the prompt as a user turn with the tokenizer's chat template and
the answer as the assistant's reply ending with the template's end-of-turn token (``edits/chat.py``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from locft_dist.edits.chat import ChatTemplate
from locft_dist.errors import EncodingError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

ENCODER_VERSION = 2
"""Bumped whenever the same tokenizer, ``Encoding`` and text may encode to other ids (token caches and
augmentation caches are keyed on it). 1: prompt and target tokenized apart; 2: target ids in context,
prompt-ending prefix rule, chat templates, trailing special tokens dropped from prompts."""

CHAT_TEMPLATES = ("none", "auto")
"""``edits.chat_template``: ``none`` (plain completion) | ``auto`` (the tokenizer's chat template: the
prompt becomes a user turn and the target the assistant's reply)."""


@dataclass(frozen=True)
class Encoding:
    """How (prompt, answer) pairs become token ids.

    Training, evaluation and augmentation all encode through one of these, and the delta records it
    (``locft.encoding``), so evaluating a delta probes exactly what the run trained.

    ``target_prefix`` applies to plain completion only: a chat reply starts right after the generation
    prompt, without a space. ``append_eos`` ends the target with the token that stops generation: EOS in
    plain completion, the template's end-of-turn token (``<|im_end|>``, ``<|eot_id|>``) in chat.
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

    def cache_key(self) -> dict[str, Any]:
        """Every field plus the encoder version: what a cache of encoded ids must be keyed on."""
        return {"encoder_version": ENCODER_VERSION, **self.to_dict()}


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


def target_text(answer: str, prefix: str = " ", prompt: str | None = None) -> str:
    """The string the model must produce after the prompt: ``prefix + answer``, unless the answer already
    starts with the prefix or the prompt already ends with it (``"... is "`` + ``"Paris"``)."""
    if not prefix or answer.startswith(prefix) or (prompt is not None and prompt.endswith(prefix)):
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


def _legacy_encoding(encoding, target_prefix, append_eos, max_length) -> Encoding:
    loose = (target_prefix, append_eos, max_length)
    if encoding is not None:
        if any(v is not None for v in loose):
            raise TypeError("pass either encoding= or target_prefix/append_eos/max_length, not both")
        return encoding
    return Encoding(
        target_prefix=" " if target_prefix is None else target_prefix,
        append_eos=True if append_eos is None else append_eos,
        max_length=max_length,
    )


def encode_pair(
    tokenizer,
    prompt: str,
    answer: str,
    encoding: Encoding | None = None,
    *,
    target_prefix: str | None = None,
    append_eos: bool | None = None,
    max_length: int | None = None,
    add_bos: bool = True,
) -> EncodedExample:
    """Encode one (prompt, answer) pair (see ``encode_pairs``)."""
    return encode_pairs(
        tokenizer,
        [prompt],
        [answer],
        encoding,
        target_prefix=target_prefix,
        append_eos=append_eos,
        max_length=max_length,
        add_bos=add_bos,
    )[0]


def encode_pairs(
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str],
    encoding: Encoding | None = None,
    *,
    target_prefix: str | None = None,
    append_eos: bool | None = None,
    max_length: int | None = None,
    add_bos: bool = True,
) -> list[EncodedExample]:
    """Encode (prompt, answer) pairs as ``encoding`` says, in a few batched tokenizer calls.

    ``target_prefix``/``append_eos``/``max_length`` describe a plain-completion encoding when no
    ``encoding`` is given (``max_length`` then defaults to no limit). The prompt gets the tokenizer's BOS
    when it normally adds one (``add_bos``; a chat template writes its own). If the sequence exceeds
    ``max_length`` the prompt is truncated from the left (its end is what the target conditions on; a
    leading BOS is kept); a target that alone does not fit is an error.
    """
    enc = _legacy_encoding(encoding, target_prefix, append_eos, max_length)
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if not prompts:
        return []
    eos: list[int] = []
    if enc.chat_template == "auto":
        chat = ChatTemplate.of(tokenizer)
        prompt_texts = chat.prompt_texts(tokenizer, prompts)
        targets = chat.reply_texts(tokenizer, prompts, answers, end_turn=enc.append_eos)
        special = False  # the template writes BOS (or not) itself
    else:
        if enc.append_eos:
            if tokenizer.eos_token_id is None:
                raise EncodingError("append_eos is set but the tokenizer has no EOS token")
            eos = [int(tokenizer.eos_token_id)]
        prompt_texts = list(prompts)
        targets = [target_text(a, enc.target_prefix, p) for p, a in zip(prompts, answers, strict=True)]
        special = add_bos
    prompt_ids = _tokenize(tokenizer, prompt_texts, special)
    target_ids = targets_in_context(tokenizer, prompt_texts, prompt_ids, targets, special)
    bos = tokenizer.bos_token_id if special else None
    return [
        _join(p, t + eos, answer, enc.max_length, bos)
        for p, t, answer in zip(prompt_ids, target_ids, answers, strict=True)
    ]


def render_prompt(
    tokenizer, prompts: Sequence[str], encoding: Encoding, *, add_bos: bool = True
) -> list[list[int]]:
    """The prompt ids ``encode_pairs`` gives these prompts (before any ``max_length`` cut), for generation
    with nothing to score: a user turn with the generation prompt in chat, the plain prompt otherwise."""
    if not prompts:
        return []
    if encoding.chat_template == "auto":
        texts = ChatTemplate.of(tokenizer).prompt_texts(tokenizer, prompts)
        return _tokenize(tokenizer, texts, False)
    return _tokenize(tokenizer, list(prompts), add_bos)


def _special_suffix_length(tokenizer) -> int:
    """How many special ids the tokenizer appends after a text (an EOS some configs add): dropped from
    prompts, which a target follows."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return len(full) - start - len(plain)
    return 0


def _tokenize(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    ids = tokenizer(texts, add_special_tokens=special)["input_ids"]
    drop = _special_suffix_length(tokenizer) if special else 0
    return [list(row[: len(row) - drop]) for row in ids] if drop else [list(row) for row in ids]


def targets_in_context(
    tokenizer,
    prompt_texts: Sequence[str],
    prompt_ids: Sequence[list[int]],
    targets: Sequence[str],
    special: bool,
) -> list[list[int]]:
    """Target ids as the tokenizer gives them after each prompt (see the module docstring).

    Two batched calls: the joined texts, then, for the few pairs whose prompt ids are not a prefix of the
    joined ids, the targets after a special token. Those are checked to decode to the joined text; a
    vocabulary that cannot spell the target apart from the prompt's end (a normalizer that prepends "▁" to
    every segment, after a prompt ending in a space) is reported.
    """
    joined = _tokenize(tokenizer, [p + t for p, t in zip(prompt_texts, targets, strict=True)], special)
    out: list[list[int]] = []
    crossing: list[int] = []
    for index, (prompt, whole) in enumerate(zip(prompt_ids, joined, strict=True)):
        if len(whole) > len(prompt) and whole[: len(prompt)] == prompt:
            out.append(whole[len(prompt) :])
        else:
            out.append([])
            crossing.append(index)
    if not crossing:
        return out
    fresh = _fresh_segments(tokenizer, [targets[i] for i in crossing])
    for index, ids in zip(crossing, fresh, strict=True):
        out[index] = ids
    got = tokenizer.batch_decode([prompt_ids[i] + out[i] for i in crossing], skip_special_tokens=True)
    want = tokenizer.batch_decode([joined[i] for i in crossing], skip_special_tokens=True)
    differ = [i for i, g, w in zip(crossing, got, want, strict=True) if g != w]
    logger.debug("%d of %d targets merge with their prompt's end", len(crossing), len(targets))
    if differ:
        logger.warning(
            "%d of %d prompts end in a way this tokenizer cannot separate from the answer (e.g. %r + %r): "
            "their targets read %r; prompts without trailing whitespace avoid this",
            len(differ),
            len(targets),
            prompt_texts[differ[0]],
            targets[differ[0]],
            tokenizer.decode(out[differ[0]]),
        )
    return out


def _fresh_segments(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each text's ids as a segment that starts a new word boundary: after a special token, removed."""
    marker = next((t for t in (tokenizer.eos_token, tokenizer.bos_token, tokenizer.unk_token) if t), None)
    marker_id = tokenizer.convert_tokens_to_ids(marker) if marker else None
    if marker is not None:
        rows = tokenizer([marker + t for t in texts], add_special_tokens=False)["input_ids"]
        if all(row and row[0] == marker_id for row in rows):
            return [list(row[1:]) for row in rows]
    return [list(row) for row in tokenizer(texts, add_special_tokens=False)["input_ids"]]


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
    logits at real positions as each example alone; under a causal mask no real position sees the padding
    either, so training passes need no attention mask (``causal_inputs``).

    The positions that predict a target token are listed here, on the host (``target_rows``,
    ``target_cols``: row and column of the position, ``target_ids``: the token it must predict,
    ``target_counts``: targets per row), so the loss never asks the device where its targets are
    (a ``nonzero`` or ``bincount`` on a GPU waits for everything queued before it).
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    rows: list[int] = []
    cols: list[int] = []
    targets: list[int] = []
    counts: list[int] = []
    for row, example in enumerate(examples):
        ids = torch.tensor(example.input_ids, dtype=torch.long)
        n = len(example.input_ids)
        input_ids[row, :n] = ids
        attention_mask[row, :n] = 1
        labels[row, example.num_prompt_tokens : n] = ids[example.num_prompt_tokens :]
        first = max(example.num_prompt_tokens, 1)  # position 0 has no position before it to predict it
        rows.extend([row] * max(n - first, 0))
        cols.extend(range(first - 1, n - 1))
        targets.extend(example.input_ids[first:n])
        counts.append(max(n - first, 0))
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "target_rows": torch.tensor(rows, dtype=torch.long),
        "target_cols": torch.tensor(cols, dtype=torch.long),
        "target_ids": torch.tensor(targets, dtype=torch.long),
        "target_counts": torch.tensor(counts, dtype=torch.long),
    }
    if any(e.weight != 1.0 for e in examples):
        batch["weights"] = torch.tensor([e.weight for e in examples], dtype=torch.float32)
    if any(e.soft_ids is not None for e in examples):
        batch.update(_collate_soft(examples, width))
    return batch


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """``batch`` on ``device``; to a GPU through pinned memory without waiting: a copy from pageable memory
    blocks the host until the GPU has drained its queue, which leaves the GPU idle while the host prepares
    the next kernels."""
    device = torch.device(device)
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def causal_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model inputs of a right-padded training batch: ids only, no attention mask.

    Under the causal mask a real position attends to earlier positions only, all real with right padding,
    so the mask changes nothing the loss reads (the padded positions' outputs are never read). Without it
    the model builds no ``[batch, 1, tokens, tokens]`` mask, does not inspect the mask on the device (a
    wait), and SDPA runs its fused causal kernels (flash attention on a GPU).
    """
    return {"input_ids": batch["input_ids"]}


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
