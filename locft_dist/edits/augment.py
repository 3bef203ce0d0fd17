"""Extra training examples made by the unedited model: pseudo-paraphrases and locality supervision.

Pseudo-paraphrases: for each edit, short prefixes sampled from the unedited model are prepended to the edit
prompt (``"<prefix>. <prompt>"``), so the edit is learned in varied contexts rather than after one exact
string. Locality supervision: prompts of facts the edits must not change are paired with the unedited
model's own continuation (greedy tokens for ``ce``, its top-k distribution for ``kl``), so training pulls
their predictions back to where they were.

Both are appended to the edit examples; the breadth-first sampler streams the whole list once per epoch, so
the seeded order and exact resume are unchanged. Both are generated once, before training, and cached in
the run directory (``augment.json``): a resumed run reads them back instead of regenerating.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from locft_dist.config import RunConfig
from locft_dist.edits.encode import (
    EncodedExample,
    Encoding,
    collate,
    encode_pairs,
    pad_token_id,
    render_prompt,
)
from locft_dist.edits.schema import EditRequest
from locft_dist.errors import EditDataError
from locft_dist.eval.passes import eval_mode, model_device

logger = logging.getLogger(__name__)

AUGMENT_FILE = "augment.json"
AUGMENT_FORMAT = "locft-augment/1"


@dataclass
class Augmentation:
    """Examples to append to the edits, and a fingerprint that changes when they would."""

    examples: list[EncodedExample]
    num_paraphrases: int
    num_locality: int
    key: str


def enabled(cfg: RunConfig) -> bool:
    return cfg.augment.paraphrases > 0 or (
        cfg.augment.locality_source != "none" and cfg.augment.locality_ratio > 0
    )


def _start_id(tokenizer) -> int:
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise EditDataError("pseudo-paraphrases need a BOS or EOS token to start sampling from")
    return int(start)


def sample_prefixes(
    model, tokenizer, num: int, num_tokens: int, seed: int, *, batch_size: int = 64
) -> list[str]:
    """``num`` texts of ``num_tokens`` tokens sampled from the model after BOS (temperature 1).

    Each token is an inverse-CDF draw from float64 CPU probabilities with a uniform fixed per (row, step)
    by ``seed``, so the result depends only on the model's logits and the seed, not on the batch size.
    """
    uniforms = torch.rand(num, num_tokens, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    device = model_device(model)
    start = _start_id(tokenizer)
    special = sorted(set(tokenizer.all_special_ids))
    texts: list[str] = []
    with eval_mode(model):
        for first in range(0, num, batch_size):
            rows = min(batch_size, num - first)
            ids = torch.full((rows, 1), start, dtype=torch.long)
            for step in range(num_tokens):
                logits = model(input_ids=ids.to(device)).logits[:, -1, :]
                probs = torch.softmax(logits.double().cpu(), dim=-1)
                probs[:, special] = 0.0  # a prefix is text: never sample BOS/EOS/pad
                cdf = probs.cumsum(-1)
                u = uniforms[first : first + rows, step : step + 1] * cdf[:, -1:]
                nxt = torch.searchsorted(cdf, u).clamp_max(probs.size(-1) - 1)  # inverse-CDF draw per row
                ids = torch.cat([ids, nxt], dim=1)
            texts.extend(tokenizer.decode(row[1:].tolist(), skip_special_tokens=True).strip() for row in ids)
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
) -> list[dict]:
    """The unedited model's greedy continuation of each prompt (and its top-k per step when ``top_k``).

    Prompts are rendered as ``encoding`` says (a user turn under a chat template). A row stops early at
    EOS (kept as a target). Returns JSON-able records of token ids, so a cached run trains on exactly the
    tokens the model produced.
    """
    eos = tokenizer.eos_token_id
    pad = pad_token_id(tokenizer)
    prompt_ids = render_prompt(tokenizer, list(prompts), encoding or Encoding())
    if max_length is not None:
        prompt_ids = [ids[max(0, len(ids) - (max_length - num_tokens)) :] for ids in prompt_ids]
    device = model_device(model)
    records: list[dict] = []
    with eval_mode(model):
        for first in range(0, len(prompts), batch_size):
            rows = [list(ids) for ids in prompt_ids[first : first + batch_size]]
            starts = [len(r) for r in rows]
            soft: list[list[tuple[list[int], list[float]]]] = [[] for _ in rows]
            done = [False] * len(rows)
            for _ in range(num_tokens):
                batch = collate([EncodedExample(tuple(r), len(r)) for r in rows], pad)
                logits = model(
                    input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
                ).logits
                last = torch.tensor([len(r) - 1 for r in rows], device=logits.device)
                step = logits[torch.arange(len(rows), device=logits.device), last].float().cpu()
                for i, row in enumerate(rows):
                    if done[i]:
                        continue
                    token = int(step[i].argmax())
                    if top_k:
                        probs = torch.softmax(step[i].double(), dim=-1)
                        values, ids = probs.topk(min(top_k, probs.numel()))
                        values = values / values.sum()
                        soft[i].append((ids.tolist(), [float(v) for v in values]))
                    row.append(token)
                    done[i] = eos is not None and token == eos
                if all(done):
                    break
            for i, row in enumerate(rows):
                record = {"prompt": prompts[first + i], "input_ids": row, "num_prompt_tokens": starts[i]}
                if top_k:
                    record["soft_ids"] = [ids for ids, _ in soft[i]]
                    record["soft_probs"] = [probs for _, probs in soft[i]]
                records.append(record)
    return records


def _key(cfg: RunConfig, edits_fingerprint: str, base_fingerprint: str) -> str:
    """What the cached examples depend on: a changed config, edit set or base model regenerates them."""
    parts = {
        "augment": {k: v for k, v in vars(cfg.augment).items()},
        "edits": edits_fingerprint,
        "base": base_fingerprint,
        "seed": cfg.train.seed,
        "encoding": Encoding.from_config(cfg.edits).cache_key(),
    }
    if cfg.augment.locality_source == "file":
        try:
            parts["locality_file"] = hashlib.sha256(Path(cfg.augment.locality_path).read_bytes()).hexdigest()
        except OSError as err:
            raise EditDataError(
                f"{cfg.augment.locality_path}: cannot read locality prompts: {err.strerror}"
            ) from None
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


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


def _generate(model, tokenizer, requests: Sequence[EditRequest], cfg: RunConfig) -> dict:
    aug = cfg.augment
    cache: dict = {"prefixes": [], "locality": []}
    if aug.paraphrases:
        logger.info("sampling %d pseudo-paraphrase prefixes per edit", aug.paraphrases)
        cache["prefixes"] = sample_prefixes(
            model, tokenizer, len(requests) * aug.paraphrases, aug.paraphrase_tokens, aug.paraphrase_seed
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
        )
        by_prompt = {t["prompt"]: t for t in targets}
        cache["locality"] = [by_prompt[p] for p in chosen]
    return cache


def _examples(
    tokenizer, requests: Sequence[EditRequest], cfg: RunConfig, cache: dict
) -> list[EncodedExample]:
    aug = cfg.augment
    prompts = [
        paraphrase_prompt(prefix, requests[i // aug.paraphrases].prompt)
        for i, prefix in enumerate(cache["prefixes"])
    ]
    examples = encode_pairs(
        tokenizer,
        prompts,
        [requests[i // aug.paraphrases].target_new for i in range(len(prompts))] if prompts else [],
        Encoding.from_config(cfg.edits),
    )
    for record in cache["locality"]:
        soft = aug.locality_loss == "kl"
        examples.append(
            EncodedExample(
                tuple(record["input_ids"]),
                record["num_prompt_tokens"],
                weight=aug.locality_weight,
                soft_ids=tuple(tuple(r) for r in record["soft_ids"]) if soft else None,
                soft_probs=tuple(tuple(r) for r in record["soft_probs"]) if soft else None,
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
) -> Augmentation:
    """Examples to append to the edits: from ``output.dir/augment.json`` if it matches, else generated.

    Every rank generates the same examples (greedy decoding and CPU-seeded sampling are deterministic);
    only the rank with ``write`` saves them.
    """
    key = _key(cfg, edits_fingerprint, base_fingerprint)
    path = Path(cfg.output.dir) / AUGMENT_FILE
    cache = None
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("format") == AUGMENT_FORMAT and saved.get("key") == key:
            cache = saved
            logger.info("reusing the augmentation cached in %s", path)
    if cache is None:
        cache = _generate(model, tokenizer, requests, cfg)
        if write:
            tmp = path.with_name(f".{AUGMENT_FILE}.tmp")
            tmp.write_text(json.dumps({"format": AUGMENT_FORMAT, "key": key, **cache}), encoding="utf-8")
            os.replace(tmp, path)
    examples = _examples(tokenizer, requests, cfg, cache)
    return Augmentation(examples, len(cache["prefixes"]), len(cache["locality"]), key)
