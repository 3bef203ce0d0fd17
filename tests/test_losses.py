"""Losses at target positions only equal the full-logits formula, in value and gradient."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from locft_dist.edits.encode import IGNORE_INDEX, EncodedExample, collate, encode_pairs
from locft_dist.logits import final_hidden, without_head
from locft_dist.losses import forward_losses, losses_from_hidden
from tests.conftest import make_random_llama


def reference_losses(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The full-logits formula the training loop used before: every position, the whole vocabulary, fp32."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = batch["labels"][:, 1:]
    token_loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    mask = (shift_labels != IGNORE_INDEX).float()
    losses = (token_loss * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
    if "is_soft" in batch:
        log_q = torch.log_softmax(shift_logits, dim=-1)
        ids, probs = batch["soft_ids"][:, 1:, :], batch["soft_probs"][:, 1:, :]
        log_q_k = torch.gather(log_q, -1, ids)
        token_kl = (probs * (torch.log(probs.clamp_min(1e-12)) - log_q_k)).sum(-1)
        kl = (token_kl * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
        losses = torch.where(batch["is_soft"], kl, losses)
    if "weights" in batch:
        losses = losses * batch["weights"]
    return losses


PAIRS = [
    ("Kesso Varn works as a", "glassblower"),
    ("The favourite colour of Rina Sol is", "amber"),
    ("Dorn Asket plays the", "violin"),
    ("Vorin Talbeck lives in the city of", "Ostrava"),
    ("The profession of Ulla Pemberton is", "cartographer"),
]


def mixed_examples(tokenizer) -> list[EncodedExample]:
    """Plain edits, a weighted one and two KL examples with top-3 soft targets (one of them weighted)."""
    examples = encode_pairs(tokenizer, [p for p, _ in PAIRS], [t for _, t in PAIRS])
    out = []
    for i, example in enumerate(examples):
        if i in (1, 4):
            n = example.num_target_tokens
            ids = torch.tensor([[1, 5 + i, 9 + j] for j in range(n)], dtype=torch.long)
            probs = torch.tensor([[0.5, 0.3, 0.2]] * n, dtype=torch.float32)
            example = dataclasses.replace(example, soft_ids=ids, soft_probs=probs)
        if i in (2, 4):
            example = dataclasses.replace(example, weight=2.5)
        out.append(example)
    return out


def _grads(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("max_logits", [None, 3], ids=["one-chunk", "chunked"])
def test_target_position_losses_equal_the_full_logits_formula(tiny_tokenizer, max_logits):
    model = make_random_llama(len(tiny_tokenizer), seed=2)
    for name, param in model.named_parameters():
        param.requires_grad_(name == "model.layers.2.mlp.down_proj.weight")
    examples = mixed_examples(tiny_tokenizer)
    batch = collate(examples, pad_id=0)
    assert {"weights", "is_soft"} <= batch.keys() and len({len(e.input_ids) for e in examples}) > 1
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = reference_losses(full, batch)
    expected_grads = _grads(model, expected.sum())
    # max_logits=3 rows' worth of the vocabulary per chunk: every chunk recomputed in backward
    kwargs = {} if max_logits is None else {"max_logits": max_logits * len(tiny_tokenizer)}
    got = forward_losses(model, batch, **kwargs)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    got_grads = _grads(model, got.sum())
    assert got_grads.keys() == expected_grads.keys() == {"model.layers.2.mlp.down_proj.weight"}
    for name, grad in expected_grads.items():
        assert grad.abs().max() > 0
        torch.testing.assert_close(got_grads[name], grad, rtol=0, atol=1e-6)


def test_the_output_layer_runs_on_target_rows_only(tiny_tokenizer):
    """The head sees exactly the target rows (never [batch, tokens]); the forward itself skips it."""
    model = make_random_llama(len(tiny_tokenizer), seed=2)
    examples = mixed_examples(tiny_tokenizer)
    batch = collate(examples, pad_id=0)
    shapes: list[tuple[int, ...]] = []
    model.lm_head.register_forward_hook(lambda _m, args, _o: shapes.append(tuple(args[0].shape)))
    with torch.no_grad():
        forward_losses(model, batch)
    num_targets = sum(e.num_target_tokens for e in examples)
    assert shapes == [(num_targets, model.config.hidden_size)]
    with torch.no_grad(), without_head(model):  # a stand-in computes nothing; the head is put back after
        assert model(input_ids=batch["input_ids"]).logits.shape[-1] == 0
    assert model.get_output_embeddings() is model.lm_head and len(shapes) == 1


def test_examples_without_targets_have_zero_loss(tiny_tokenizer):
    model = make_random_llama(len(tiny_tokenizer))
    batch = collate([EncodedExample((1, 5, 6, 7), 2), EncodedExample((1, 5, 6), 3)], pad_id=0)
    with torch.no_grad():
        hidden = final_hidden(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        losses = losses_from_hidden(model, hidden, batch)
    assert losses[1] == 0 and losses[0] > 0


def test_bfloat16_losses_match_the_full_formula(tiny_tokenizer):
    """Only the target rows are upcast; their values are those of the full formula's upcast logits."""
    model = make_random_llama(len(tiny_tokenizer), seed=4).to(torch.bfloat16)
    batch = collate(mixed_examples(tiny_tokenizer), pad_id=0)
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected = reference_losses(full, batch)
        got = forward_losses(model, batch)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-2 * expected.abs().max().item())
