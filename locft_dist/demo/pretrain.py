"""Pretrain a tiny Llama from scratch until it knows the demo world's facts.

An editor can only be judged on a model that knew the old fact, so pretraining runs until at least
``target_accuracy`` of the facts are known under template 0 (the edit prompt), checked after every epoch
with one batched teacher-forced pass. "Known" means the argmax at every answer position reproduces the
tokens of ``" " + object``, which is what greedy decoding would produce.

Sequences are ``sentence tokens + </s>`` with no BOS (see ``tokenizer.py``); batches are right-padded and
run without an attention mask: causal attention never lets a real token see the padding after it, and
padded positions are excluded from the loss. Deterministic for a seed on a given machine and thread
count (CPU kernels may sum in a different order with another thread count).
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from locft_dist.demo.world import World

logger = logging.getLogger(__name__)


@dataclass
class PretrainReport:
    """What pretraining achieved and what it cost."""

    epochs: int
    steps: int
    seconds: float
    final_loss: float
    knowledge_template0: float
    knowledge_all_templates: float
    reached_target: bool
    num_parameters: int
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class _Encoded:
    """The corpus as token rows plus, per row, where its answer tokens sit."""

    rows: list[list[int]]
    answer_start: list[int]  # index of the first answer token in the row
    answer_len: list[int]
    template: list[int]


def encode_world(world: World, tokenizer: PreTrainedTokenizerBase) -> _Encoded:
    """Tokenize every (fact, template) as prompt + " " + object + </s>."""
    enc = _Encoded([], [], [], [])
    eos = tokenizer.eos_token_id
    for fact in world.facts:
        answer = tokenizer(" " + fact.object, add_special_tokens=False)["input_ids"]
        for t in range(world.num_templates(fact)):
            prompt = tokenizer(world.prompt(fact, t), add_special_tokens=False)["input_ids"]
            enc.rows.append(prompt + answer + [eos])
            enc.answer_start.append(len(prompt))
            enc.answer_len.append(len(answer))
            enc.template.append(t)
    return enc


def _pad(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long)


def _length_bucketed_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of similar-length rows, so right-padding wastes little compute."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * 32
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: lengths[i])
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


@torch.no_grad()
def knowledge(
    model: LlamaForCausalLM,
    enc: _Encoded,
    pad_id: int,
    *,
    templates: set[int] | None = None,
    batch_size: int = 512,
) -> float:
    """Fraction of rows (restricted to ``templates``) whose answer tokens are all the argmax."""
    was_training = model.training
    model.eval()
    index = [i for i, t in enumerate(enc.template) if templates is None or t in templates]
    index.sort(key=lambda i: len(enc.rows[i]))
    correct = 0
    for start in range(0, len(index), batch_size):
        part = index[start : start + batch_size]
        ids = _pad([enc.rows[i] for i in part], pad_id)
        pred = model(input_ids=ids).logits.argmax(-1)
        for row, i in enumerate(part):
            a, n = enc.answer_start[i], enc.answer_len[i]
            correct += bool(torch.equal(pred[row, a - 1 : a - 1 + n], ids[row, a : a + n]))
    model.train(was_training)
    return correct / max(1, len(index))


def make_model(
    tokenizer: PreTrainedTokenizerBase,
    *,
    num_layers: int,
    hidden_size: int,
    intermediate_size: int,
    num_heads: int,
    seed: int,
) -> LlamaForCausalLM:
    """A small Llama whose special-token ids match the tokenizer; tied embeddings keep it small."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=128,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def pretrain(
    world: World,
    tokenizer: PreTrainedTokenizerBase,
    *,
    num_layers: int = 4,
    hidden_size: int = 128,
    intermediate_size: int = 512,
    num_heads: int = 4,
    seed: int = 0,
    max_epochs: int = 12,
    batch_size: int = 64,
    lr: float = 3e-3,
    warmup_steps: int = 50,
    weight_decay: float = 0.0,
    target_accuracy: float = 0.99,
    time_budget_s: float | None = None,
    log_every: int = 1,
    progress: bool = True,
) -> tuple[LlamaForCausalLM, PretrainReport]:
    """Train a fresh tiny Llama on ``world.pretraining_corpus()`` until it knows the facts.

    Stops after the first epoch whose template-0 knowledge reaches ``target_accuracy``, after
    ``max_epochs``, or when ``time_budget_s`` runs out (checked per epoch). The learning rate warms up
    linearly, then follows a cosine to 10% over ``max_epochs``; stopping early simply ends it there.
    """
    if max_epochs < 1 or batch_size < 1 or not 0.0 < target_accuracy <= 1.0:
        raise ValueError("pretrain needs max_epochs >= 1, batch_size >= 1 and 0 < target_accuracy <= 1")
    model = make_model(
        tokenizer,
        num_layers=num_layers,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_heads=num_heads,
        seed=seed,
    )
    model.train()
    enc = encode_world(world, tokenizer)
    pad_id = tokenizer.pad_token_id
    rng = random.Random(seed)
    steps_per_epoch = math.ceil(len(enc.rows) / batch_size)
    total_steps = steps_per_epoch * max_epochs
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay, eps=1e-8
    )

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        progress_frac = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_frac)))

    lengths = [len(r) for r in enc.rows]
    history: list[dict[str, float]] = []
    start_time = time.perf_counter()
    step, epoch, loss_value, know0 = 0, 0, float("nan"), 0.0
    bar = tqdm(total=total_steps, desc="pretrain", unit="step", mininterval=1.0, disable=not progress)
    while epoch < max_epochs:
        epoch += 1
        loss_sum, loss_count = 0.0, 0
        for batch in _length_bucketed_batches(lengths, batch_size, rng):
            ids = _pad([enc.rows[i] for i in batch], pad_id)
            labels = ids[:, 1:].masked_fill(ids[:, 1:] == pad_id, -100)
            logits = model(input_ids=ids[:, :-1]).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            loss_sum += loss.item()
            loss_count += 1
            bar.update(1)
        loss_value = loss_sum / max(1, loss_count)
        know0 = knowledge(model, enc, pad_id, templates={0})
        elapsed = time.perf_counter() - start_time
        history.append({"epoch": epoch, "loss": loss_value, "knowledge_template0": know0, "seconds": elapsed})
        bar.set_postfix(epoch=epoch, loss=f"{loss_value:.3f}", know0=f"{know0:.3f}")
        if log_every and epoch % log_every == 0:
            logger.info(
                "epoch %d step %d loss %.4f knowledge(t0) %.4f %.1fs", epoch, step, loss_value, know0, elapsed
            )
        if know0 >= target_accuracy:
            break
        if time_budget_s is not None and elapsed >= time_budget_s:
            logger.warning(
                "pretraining stopped by its time budget (%.0fs) at knowledge %.3f", time_budget_s, know0
            )
            break
    bar.close()
    model.eval()
    know_all = knowledge(model, enc, pad_id)
    report = PretrainReport(
        epochs=epoch,
        steps=step,
        seconds=time.perf_counter() - start_time,
        final_loss=loss_value,
        knowledge_template0=know0,
        knowledge_all_templates=know_all,
        reached_target=know0 >= target_accuracy,
        num_parameters=sum(p.numel() for p in model.parameters()),
        history=history,
    )
    logger.info(
        "pretrained in %.1fs: %d epochs, knowledge %.4f (template 0), %.4f (all templates)",
        report.seconds,
        epoch,
        know0,
        know_all,
    )
    return model, report
