"""Extra training examples made by the unedited model: pseudo-paraphrases and locality supervision.

Pseudo-paraphrases: for each edit, short prefixes sampled from the unedited model are prepended to the edit
prompt (``"<prefix>. <prompt>"``), so the edit is learned in varied contexts rather than after one exact
string. Locality supervision: prompts of facts the edits must not change are paired with the unedited
model's own continuation (greedy tokens for ``ce``, its top-k distribution for ``kl``), so training pulls
their predictions back to where they were.

Both are appended to the edit examples; the breadth-first sampler streams the whole list once per epoch, so
the seeded order and exact resume are unchanged. Both are generated once, before training, and cached in
the run directory (``augment.safetensors``, ``edits/augment_store.py``): a resumed run reads them back.

Generation is sharded: the rows are cut into fixed batches and rank ``r`` runs batches ``r, r + W, ...``;
the results are gathered in batch order. A batch is computed exactly as one process computes it, so every
world size produces the same examples. Under FSDP2 and ZeRO-3 a forward is a collective, so ranks with
fewer batches run a throwaway pass and a batch's greedy loop ends when every rank's rows are done.
Each step reads the output layer at the last position only (``logits.final_hidden``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from locft_dist.config import RunConfig
from locft_dist.edits import augment_store
from locft_dist.edits.encode import (
    EncodedExample,
    Encoding,
    collate,
    encode_pairs,
    pad_token_id,
    render_prompt,
)
from locft_dist.edits.schema import EditRequest
from locft_dist.edits.wordings import wordings_for_edits
from locft_dist.errors import EditDataError
from locft_dist.eval.passes import eval_mode, model_device
from locft_dist.logits import final_hidden, head_logits

logger = logging.getLogger(__name__)

AUGMENT_FILE = augment_store.FILE
WORDINGS_KEYS = {"wordings", "wordings_path", "wordings_min_count"}
T = TypeVar("T")


class Shard(Protocol):
    """What sharded generation needs from a strategy: the rank, and gathering results across ranks."""

    rank: int
    world_size: int

    def all_gather_object(self, obj: Any) -> list[Any]: ...

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor: ...


class OneProcess:
    """The shard of a single process: it runs every batch."""

    rank = 0
    world_size = 1

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


@dataclass
class Augmentation:
    """Examples to append to the edits, and a fingerprint that changes when they would."""

    examples: list[EncodedExample]
    num_paraphrases: int
    num_locality: int
    key: str
    num_wordings: int = 0


def enabled(cfg: RunConfig) -> bool:
    return (
        cfg.augment.paraphrases > 0
        or cfg.augment.wordings > 0
        or (cfg.augment.locality_source != "none" and cfg.augment.locality_ratio > 0)
    )


def relation_wordings(cfg: RunConfig, requests: Sequence[EditRequest]) -> list[list[str]] | None:
    """``augment.wordings``: each edit's other wordings of its relation, from ``augment.wordings_path``'s
    records (None when off)."""
    aug = cfg.augment
    if aug.wordings <= 0:
        return None
    from locft_dist.edits.formats import load_edits  # the format readers are only needed here

    pool = load_edits(aug.wordings_path, skip_invalid=True, warn=False).requests
    return wordings_for_edits(pool, requests, num=aug.wordings, min_count=aug.wordings_min_count)


def sharded_batches(
    num: int, batch_size: int, shard: Shard, run: Callable[[list[int]], list[T]]
) -> tuple[list[T], list[int]]:
    """``run`` over rows ``0..num-1`` in fixed batches of ``batch_size``, this rank's batches only, then
    gathered: every rank gets all ``num`` results in row order, and the rows each rank generated.
    ``run`` must return one result per row.
    """
    if num == 0:
        return [], [0] * shard.world_size
    starts = list(range(0, num, batch_size))
    local: dict[int, list[T]] = {}
    for round_ in range(math.ceil(len(starts) / shard.world_size)):
        batch = round_ * shard.world_size + shard.rank
        if batch < len(starts):
            rows = list(range(starts[batch], min(starts[batch] + batch_size, num)))
            local[batch] = run(rows)
        else:
            run([0])  # a throwaway pass: under FSDP2/ZeRO-3 every rank must run as many forwards
    merged: dict[int, list[T]] = {}
    parts = shard.all_gather_object(local)
    for part in parts:
        merged.update(part)
    rows_by_rank = [sum(len(results) for results in part.values()) for part in parts]
    return [result for batch in range(len(starts)) for result in merged[batch]], rows_by_rank


def _last_logits(model, ids: torch.Tensor, mask: torch.Tensor | None, last: torch.Tensor) -> torch.Tensor:
    """float32 CPU logits at position ``last[row]`` of each row (the output layer on those rows only)."""
    inputs = {"input_ids": ids} if mask is None else {"input_ids": ids, "attention_mask": mask}
    hidden = final_hidden(model, **inputs)
    rows = torch.arange(ids.shape[0], device=hidden.device)
    return head_logits(model, hidden[rows, last.to(hidden.device)]).float().cpu()


def _start_id(tokenizer) -> int:
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise EditDataError("pseudo-paraphrases need a BOS or EOS token to start sampling from")
    return int(start)


def sample_prefixes(
    model,
    tokenizer,
    num: int,
    num_tokens: int,
    seed: int,
    *,
    batch_size: int = 64,
    shard: Shard | None = None,
) -> list[str]:
    """``num`` texts of ``num_tokens`` tokens sampled from the model after BOS (temperature 1).

    Each token is an inverse-CDF draw from float64 CPU probabilities with a uniform fixed per (row, step)
    by ``seed``, so the result depends only on the model's logits and the seed, not on the batch size.
    """
    uniforms = torch.rand(num, num_tokens, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    device = model_device(model)
    start = _start_id(tokenizer)
    special = sorted(set(tokenizer.all_special_ids))

    def run(rows: list[int]) -> list[str]:
        ids = torch.full((len(rows), 1), start, dtype=torch.long)
        for step in range(num_tokens):
            last = torch.full((len(rows),), ids.shape[1] - 1)
            probs = torch.softmax(_last_logits(model, ids.to(device), None, last).double(), dim=-1)
            probs[:, special] = 0.0  # a prefix is text: never sample BOS/EOS/pad
            cdf = probs.cumsum(-1)
            u = uniforms[rows, step : step + 1] * cdf[:, -1:]
            nxt = torch.searchsorted(cdf, u).clamp_max(probs.size(-1) - 1)  # inverse-CDF draw per row
            ids = torch.cat([ids, nxt], dim=1)
        return [tokenizer.decode(row[1:].tolist(), skip_special_tokens=True).strip() for row in ids]

    with eval_mode(model):
        texts, rows_by_rank = sharded_batches(num, batch_size, shard or OneProcess(), run)
    logger.info("pseudo-paraphrase prefixes generated by each rank: %s", rows_by_rank)
    return texts


def paraphrase_prompt(prefix: str, prompt: str) -> str:
    return f"{prefix}. {prompt}" if prefix else prompt


def read_locality_prompts(path: str | Path) -> list[str]:
    """Prompts from JSONL (a "prompt" field per line) or plain text (one prompt per line)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise EditDataError(f"{path}: cannot read locality prompts: {err.strerror}") from None
    prompts = []
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise EditDataError(f"{path}: line {number}: invalid JSON: {err.msg}") from None
            prompt = record.get("prompt")
            if not isinstance(prompt, str) or not prompt.strip():
                raise EditDataError(f"{path}: line {number}: field 'prompt' must be a non-empty string")
            prompts.append(prompt)
        else:
            prompts.append(line)
    if not prompts:
        raise EditDataError(f"{path}: no locality prompts")
    return prompts


def choose(pool: Sequence[str], num: int, seed: int) -> list[str]:
    """``num`` prompts drawn without replacement, the pool repeated whole when it is too small."""
    rng = random.Random(seed)
    chosen: list[str] = []
    while num - len(chosen) >= len(pool):
        chosen.extend(rng.sample(list(pool), len(pool)))
    return chosen + rng.sample(list(pool), num - len(chosen))


def locality_targets(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    num_tokens: int,
    top_k: int | None = None,
    max_length: int | None = None,
    batch_size: int = 64,
    encoding: Encoding | None = None,
    shard: Shard | None = None,
) -> list[EncodedExample]:
    """The unedited model's greedy continuation of each prompt as a training example (the continuation is
    the target), with its top-k distribution per step as soft targets when ``top_k``.

    Prompts are rendered as ``encoding`` says (a user turn under a chat template). A row stops early at
    EOS (kept as a target).
    """
    shard = shard or OneProcess()
    eos = tokenizer.eos_token_id
    pad = pad_token_id(tokenizer)
    prompt_ids = render_prompt(tokenizer, list(prompts), encoding or Encoding())
    if max_length is not None:
        prompt_ids = [ids[max(0, len(ids) - (max_length - num_tokens)) :] for ids in prompt_ids]
    device = model_device(model)

    def run(rows_of_batch: list[int]) -> list[EncodedExample]:
        rows = [list(prompt_ids[i]) for i in rows_of_batch]
        starts = [len(r) for r in rows]
        soft_ids: list[list[torch.Tensor]] = [[] for _ in rows]
        soft_probs: list[list[torch.Tensor]] = [[] for _ in rows]
        done = [False] * len(rows)
        for _ in range(num_tokens):
            batch = collate([EncodedExample(tuple(r), len(r)) for r in rows], pad)
            last = torch.tensor([len(r) - 1 for r in rows])
            step = _last_logits(
                model, batch["input_ids"].to(device), batch["attention_mask"].to(device), last
            )
            tokens = step.argmax(-1).tolist()
            if top_k:
                probs = torch.softmax(step.double(), dim=-1)
                values, top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
                values = (values / values.sum(-1, keepdim=True)).float()
            for i, row in enumerate(rows):
                if done[i]:
                    continue
                if top_k:
                    soft_ids[i].append(top[i])
                    soft_probs[i].append(values[i])
                row.append(tokens[i])
                done[i] = eos is not None and tokens[i] == eos
            # every rank's forwards stay in step: stop once no rank has a row still generating
            if not shard.all_reduce_max(torch.tensor([0.0 if all(done) else 1.0])).item():
                break
        return [
            EncodedExample(
                tuple(row),
                starts[i],
                soft_ids=torch.stack(soft_ids[i]) if top_k else None,
                soft_probs=torch.stack(soft_probs[i]) if top_k else None,
            )
            for i, row in enumerate(rows)
        ]

    with eval_mode(model):
        examples, rows_by_rank = sharded_batches(len(prompt_ids), batch_size, shard, run)
    logger.info("locality continuations generated by each rank: %s", rows_by_rank)
    return examples


def _key(cfg: RunConfig, edits_fingerprint: str, base_fingerprint: str) -> str:
    """What the cached examples depend on: a changed config, edit set or base model regenerates them."""
    # how generation is batched is not what the examples mean: a new batch size reuses the cache; the
    # wordings keys are left out while they are off, so runs from before they existed keep their key
    unused = {"batch_size"} | (set() if cfg.augment.wordings > 0 else WORDINGS_KEYS)
    parts = {
        "augment": {k: v for k, v in vars(cfg.augment).items() if k not in unused},
        "edits": edits_fingerprint,
        "base": base_fingerprint,
        "seed": cfg.train.seed,
        "encoding": Encoding.from_config(cfg.edits).cache_key(),
    }
    if cfg.augment.locality_source == "file":
        parts["locality_file"] = _file_digest(cfg.augment.locality_path, "locality prompts")
    if cfg.augment.wordings > 0:
        parts["wordings_file"] = _file_digest(cfg.augment.wordings_path, "records for relation wordings")
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _file_digest(path: str | Path, what: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as err:
        raise EditDataError(f"{path}: cannot read {what}: {err.strerror}") from None


def _locality_pool(cfg: RunConfig, requests: Sequence[EditRequest]) -> list[str]:
    if cfg.augment.locality_source == "file":
        return read_locality_prompts(cfg.augment.locality_path)
    logger.warning(
        "augment.locality_source=edits trains on the edit file's locality prompts: the locality metric "
        "then measures training prompts, not held-out ones"
    )
    pool = list(dict.fromkeys(p.prompt for r in requests for p in r.locality_prompts))
    if not pool:
        raise EditDataError(
            f"{cfg.edits.path}: augment.locality_source=edits, but no edit has locality prompts"
        )
    return pool


def _generate(
    model, tokenizer, requests: Sequence[EditRequest], cfg: RunConfig, shard: Shard
) -> augment_store.Generated:
    aug = cfg.augment
    generated = augment_store.Generated([], [])
    if aug.paraphrases:
        num = len(requests) * aug.paraphrases
        logger.info("sampling %d pseudo-paraphrase prefixes per edit (%d in all)", aug.paraphrases, num)
        generated.prefixes = sample_prefixes(
            model,
            tokenizer,
            num,
            aug.paraphrase_tokens,
            aug.paraphrase_seed,
            batch_size=aug.batch_size,
            shard=shard,
        )
    num = round(aug.locality_ratio * len(requests)) if aug.locality_source != "none" else 0
    if num > 0:
        chosen = choose(_locality_pool(cfg, requests), num, cfg.train.seed)
        unique = list(dict.fromkeys(chosen))
        logger.info("locality supervision: %d examples, %d prompts (%s)", num, len(unique), aug.locality_loss)
        targets = locality_targets(
            model,
            tokenizer,
            unique,
            num_tokens=aug.locality_tokens,
            top_k=aug.locality_top_k if aug.locality_loss == "kl" else None,
            max_length=cfg.edits.max_length,
            encoding=Encoding.from_config(cfg.edits),
            batch_size=aug.batch_size,
            shard=shard,
        )
        by_prompt = dict(zip(unique, targets, strict=True))
        generated.locality = [by_prompt[p] for p in chosen]
    return generated


def _examples(
    tokenizer,
    requests: Sequence[EditRequest],
    cfg: RunConfig,
    generated: augment_store.Generated,
    wordings: Sequence[Sequence[str]],
) -> list[EncodedExample]:
    """The other wordings as they are, then the pseudo-paraphrases (an edit's prefixes go before its other
    wordings in turn, then its prompt), then the locality examples."""
    aug = cfg.augment
    prompts = [w for words in wordings for w in words]
    owners = [i for i, words in enumerate(wordings) for _ in words]
    for j, prefix in enumerate(generated.prefixes):
        edit = j // aug.paraphrases
        choices = [*wordings[edit], requests[edit].prompt] if wordings else [requests[edit].prompt]
        prompts.append(paraphrase_prompt(prefix, choices[(j % aug.paraphrases) % len(choices)]))
        owners.append(edit)
    examples = encode_pairs(
        tokenizer, prompts, [requests[i].target_new for i in owners], Encoding.from_config(cfg.edits)
    )
    soft = aug.locality_loss == "kl"
    for example in generated.locality:
        examples.append(
            EncodedExample(
                example.input_ids,
                example.num_prompt_tokens,
                weight=aug.locality_weight,
                soft_ids=example.soft_ids if soft else None,
                soft_probs=example.soft_probs if soft else None,
            )
        )
    return examples


def build_augmentation(
    model,
    tokenizer,
    requests: Sequence[EditRequest],
    cfg: RunConfig,
    *,
    edits_fingerprint: str,
    base_fingerprint: str,
    write: bool,
    shard: Shard | None = None,
    wordings: Sequence[Sequence[str]] | None = None,
) -> Augmentation:
    """Examples to append to the edits: from ``output.dir/augment.safetensors`` if it matches, else
    generated (sharded over ``shard``'s ranks and gathered); only the rank with ``write`` saves them.
    ``wordings`` (``relation_wordings``) are each edit's other wordings, trained as they are and under
    the prefixes."""
    key = _key(cfg, edits_fingerprint, base_fingerprint)
    path = Path(cfg.output.dir) / AUGMENT_FILE
    generated = augment_store.load(path, key)
    if generated is not None:
        logger.info("reusing the augmentation cached in %s", path)
    else:
        generated = _generate(model, tokenizer, requests, cfg, shard or OneProcess())
        if write:
            augment_store.save(path, key, generated)
    wordings = list(wordings) if wordings is not None else relation_wordings(cfg, requests) or []
    examples = _examples(tokenizer, requests, cfg, generated, wordings)
    num_wordings = sum(len(w) for w in wordings)
    return Augmentation(examples, len(generated.prefixes), len(generated.locality), key, num_wordings)
