"""Edit facts through the input-embedding rows of the edited subjects' tokens (``locate.subject_embeddings``).

A change to an MLP matrix reaches every prompt: on a small model, the unrelated prompts' greedy answers
move with it (docs/editing_quality.md). A change to the embedding rows of a few rare tokens reaches only
prompts that contain one of them; every other prompt computes exactly what the unedited model computes.
The rows are the tokens that overlap each edit's subject in its prompt, less *common* tokens, those found
in more than ``locate.common_token_share`` of a reference text of unrelated prompts (" of", " The",
frequent first names would carry the edit into unrelated text); a subject whose tokens are all common
keeps its rarest one, so that every edit has a row. Prompts alone undercount what the model *writes*: digits
(years), nationalities and religions fill its answers, and a tuned row among them changes every generation
that passes through it. ``locate.common_generated_tokens`` adds the unedited model's greedy continuation of
each reference prompt to that prompt's text.

The trainable tensor is the input embedding's weight with its gradient masked to those rows, so the
optimizer, checkpoints, resume and the delta see an ordinary parameter whose other rows never move (Adam
steps a zero gradient by zero; weight decay, which would move them, is refused). Where the output layer
shares that weight (tied embeddings, e.g. SmolLM2, Llama-3.2), the run unties it first: the output layer
keeps a frozen copy of the base weight, since moving those tokens' output logits in every prompt undoes the
point (docs/editing_quality.md measures it). The delta then records the untied output layer
(``locft.untied_output``) and whoever applies it unties too. The delta file stores the changed rows only.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from locft_dist.edits.encode import Encoding, render_prompt
from locft_dist.edits.schema import EditRequest
from locft_dist.errors import EditDataError
from locft_dist.locate import Location

logger = logging.getLogger(__name__)

UNTIED_OUTPUT = "locft.untied_output"
"""Delta metadata (JSON ``{"input": name, "output": name}``): the run gave the output layer its own copy of
the input embedding's base weight, so the delta's embedding rows must not move the output logits."""


def subject_token_positions(tokenizer, prompt: str, subject: str) -> list[tuple[int, int]]:
    """(position among the prompt's tokens, id) of the tokens that overlap the subject's first occurrence
    (empty if it is absent)."""
    start = prompt.find(subject) if subject else -1
    if start < 0:
        return []
    end = start + len(subject)
    encoded = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=False)
    spans = enumerate(zip(encoded["input_ids"], encoded["offset_mapping"], strict=True))
    return [(position, token) for position, (token, (first, last)) in spans if first < end and last > start]


def subject_token_ids(tokenizer, prompt: str, subject: str) -> list[int]:
    """Ids of the prompt's tokens that overlap the subject's first occurrence (empty if it is absent)."""
    return [token for _, token in subject_token_positions(tokenizer, prompt, subject)]


def prompts_open_the_sequence(tokenizer, encoding: Encoding) -> bool:
    """Whether a prompt's first token is the first token the model reads: no BOS and no chat turn before it
    (SmolLM2 in plain completion; not Llama-3, whose tokenizer adds a BOS, nor any chat rendering)."""
    probe = "Paris is the capital of"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    return render_prompt(tokenizer, [probe], encoding)[0][: len(bare)] == bare


@torch.no_grad()
def with_continuations(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    num_tokens: int,
    *,
    batch_size: int = 64,
    progress: bool = False,
) -> list[str]:
    """Each prompt followed by the model's greedy continuation of ``num_tokens`` tokens (up to EOS): text
    that also holds the tokens the model generates, for counting which tokens are common."""
    from locft_dist.edits.encode import pad_token_id
    from locft_dist.eval.generate import greedy_generate, model_eos_ids
    from locft_dist.eval.passes import eval_mode, model_device

    vocab_size = model.get_output_embeddings().weight.shape[0]
    stop = torch.zeros(vocab_size, dtype=torch.bool)
    for eos in {tokenizer.eos_token_id, *model_eos_ids(model)} - {None}:
        stop[int(eos)] = True
    pad_id = pad_token_id(tokenizer)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] or [pad_id] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # similar lengths pad least
    texts = list(prompts)
    with eval_mode(model):
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc="common text: continuations", unit="batch", disable=not progress):
            rows = order[start : start + batch_size]
            generated = greedy_generate(
                model,
                [encoded[i] for i in rows],
                max_new_tokens=num_tokens,
                pad_id=pad_id,
                stop=stop,
                device=model_device(model),
            )
            for row, ids in zip(rows, generated, strict=True):
                texts[row] = prompts[row] + tokenizer.decode(ids, skip_special_tokens=True)
    return texts


def document_frequency(tokenizer, texts: Sequence[str]) -> Counter:
    """In how many of ``texts`` each token id occurs."""
    counts: Counter = Counter()
    for text in texts:
        counts.update(set(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return counts


@dataclass(frozen=True)
class SubjectRows:
    """The rows to tune, and how they were chosen (logged and written to the run log)."""

    rows: tuple[int, ...]
    common_tokens: int
    edits_on_rarest: int
    """Edits whose subject had only common tokens and keeps its rarest one."""
    sequence_start_tokens: int = 0
    """Rows the default choice tunes and this one leaves alone because they open a prompt
    (``locate.tune_sequence_start=false``)."""
    untied_output: dict[str, str] | None = None
    """Set when the run untied a tied output layer (``untie_output_layer``)."""

    def summary(self) -> dict[str, Any]:
        return {
            "rows": len(self.rows),
            "common_tokens": self.common_tokens,
            "edits_on_rarest": self.edits_on_rarest,
            "sequence_start_tokens": self.sequence_start_tokens,
            "untied_output": self.untied_output,
        }

    def delta_metadata(self) -> dict[str, str]:
        """What the delta must say for whoever applies it (the untied output layer, if any)."""
        return untied_output_metadata(self.untied_output)


def choose_subject_rows(
    tokenizer,
    requests: Sequence[EditRequest],
    reference: Sequence[str],
    *,
    max_share: float,
    source: str = "edits",
    other_prompts: Sequence[Sequence[str]] | None = None,
    avoid_sequence_start: bool = False,
) -> SubjectRows:
    """The input-embedding rows of the edited subjects' tokens, less those common in ``reference``.

    ``other_prompts`` are more prompts each edit trains in (``augment.wordings``): the subject's tokens in
    them count too (a subject that opens a sentence is tokenized without its leading space), each prompt
    keeping at least its rarest one. ``avoid_sequence_start``: a token that opens any of these prompts
    (the model's first position, where attention sinks) is tuned only for a prompt whose subject has no
    other uncommon token.
    Raises ``EditDataError`` naming the edit when a record has no subject or its prompt does not contain it.
    """
    frequency = document_frequency(tokenizer, reference)
    limit = max_share * len(reference)
    common = sum(1 for count in frequency.values() if count > limit)
    prompts: list[list[list[tuple[int, int]]]] = []  # per edit, per prompt: the subject's (position, id)
    for index, request in enumerate(requests):
        if not request.subject:
            raise EditDataError(
                f"{source}: edit {index} ({request.prompt!r}): field 'subject' is missing; "
                "locate.subject_embeddings tunes the subject's tokens"
            )
        spans = subject_token_positions(tokenizer, request.prompt, request.subject)
        if not spans:
            raise EditDataError(
                f"{source}: edit {index}: field 'subject' ({request.subject!r}) does not occur in field "
                f"'prompt' ({request.prompt!r})"
            )
        more = other_prompts[index] if other_prompts else ()
        found = (subject_token_positions(tokenizer, prompt, request.subject) for prompt in more)
        prompts.append([spans, *(other for other in found if other)])
    starts = (
        {spans[0][1] for edit in prompts for spans in edit if spans[0][0] == 0}
        if avoid_sequence_start
        else set()
    )
    rows, on_rarest = _pick_rows(prompts, frequency, limit, starts)
    left_alone = len(_pick_rows(prompts, frequency, limit, set())[0] - rows) if starts else 0
    return SubjectRows(tuple(sorted(rows)), common, on_rarest, left_alone)


def _pick_rows(
    prompts: list[list[list[tuple[int, int]]]], frequency: Counter, limit: float, starts: set[int]
) -> tuple[set[int], int]:
    """Each prompt's uncommon subject tokens, less ``starts`` where others remain, else its rarest token;
    and how many edits' own prompts fell back to their rarest token."""
    rows: set[int] = set()
    on_rarest = 0
    for edit in prompts:
        for number, spans in enumerate(edit):
            ids = [token for _, token in spans]
            kept = _uncommon(ids, frequency, limit)
            if number == 0 and not kept:
                on_rarest += 1
            rows.update([token for token in kept if token not in starts] or kept or [_rarest(ids, frequency)])
    return rows, on_rarest


def _uncommon(ids: Sequence[int], frequency: Counter, limit: float) -> list[int]:
    return [token for token in ids if frequency.get(token, 0) <= limit]


def _rarest(ids: Sequence[int], frequency: Counter) -> int:
    return min(ids, key=lambda token: (frequency.get(token, 0), token))


def input_embedding_name(model: nn.Module) -> str:
    """The canonical parameter name of the input embedding's weight."""
    weight = model.get_input_embeddings().weight
    for name, param in model.named_parameters():
        if param is weight:
            return name
    raise ValueError(f"{type(model).__name__}: the input embedding's weight is not a named parameter")


def subject_embedding_location(model: nn.Module) -> Location:
    """The input embedding as the run's one trainable tensor (no decoder layer: no prefix cache)."""
    name = input_embedding_name(model)
    return Location(layers=(), modules=("subject embedding rows",), parameter_names=(name,))


def tied_to_output(model: nn.Module) -> bool:
    """Whether the output layer computes with the input embedding's weight (tied embeddings)."""
    output = model.get_output_embeddings()
    return output is not None and output.weight is model.get_input_embeddings().weight


def _output_weight_name(model: nn.Module) -> str:
    output = model.get_output_embeddings()
    for name, module in model.named_modules(remove_duplicate=False):
        if module is output:
            return f"{name}.weight"
    raise ValueError(f"{type(model).__name__}: the output layer is not a named module")


def untie_output_layer(model: nn.Module) -> dict[str, str] | None:
    """Give a tied output layer a frozen copy of the shared weight (same values, dtype and device), so that
    training the input embedding leaves every output logit as it was; the delta metadata that says so (None
    when the model is not tied)."""
    if not tied_to_output(model):
        return None
    names = {"input": input_embedding_name(model), "output": _output_weight_name(model)}
    output = model.get_output_embeddings()
    output.weight = nn.Parameter(output.weight.detach().clone(), requires_grad=False)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False  # save_pretrained and a later tie_weights() keep them apart
    logger.info("untied %s from %s: the output layer keeps the base weight", names["output"], names["input"])
    return names


def untied_output_metadata(untied: dict[str, str] | None) -> dict[str, str]:
    """The delta metadata entry for an untied output layer (none when the model was not tied)."""
    return {UNTIED_OUTPUT: json.dumps(untied, sort_keys=True)} if untied else {}


def untied_output(metadata: dict[str, str]) -> dict[str, str] | None:
    """The ``locft.untied_output`` record of a delta's metadata, or None."""
    value = metadata.get(UNTIED_OUTPUT)
    return json.loads(value) if value else None


def untie_for_delta(model: nn.Module, metadata: dict[str, str]) -> None:
    """Before adding a delta made on an untied output layer: untie the model the same way."""
    record = untied_output(metadata)
    if record is not None and tied_to_output(model):
        untie_output_layer(model)


def restrict_to_rows(param: nn.Parameter, rows: Sequence[int]) -> torch.utils.hooks.RemovableHandle:
    """Zero the gradient of ``param`` outside ``rows`` (dimension 0) on every backward."""
    mask = torch.zeros(param.shape[0], 1, dtype=param.dtype, device=param.device)
    mask[torch.as_tensor(list(rows), dtype=torch.long, device=param.device)] = 1
    return param.register_hook(lambda grad: grad * mask.to(grad.dtype))
