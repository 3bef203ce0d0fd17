"""Frozen-prefix cache: partial forward == full forward; training with the cache == training without."""

import dataclasses
import logging

import pytest
import torch

from locft_dist.batching import length_sorted_chunks, rank_chunks
from locft_dist.edits.encode import collate
from locft_dist.logits import head_logits
from locft_dist.parallel.single import SingleProcess
from locft_dist.prefix_cache import (
    DEVICE_FREE_FRACTION,
    PrefixCache,
    device_budget_bytes,
    first_trainable_layer,
)
from locft_dist.sampler import BreadthFirstSampler
from locft_dist.trainer import train_breadth_first
from tests.conftest import make_random_llama
from tests.test_trainer import cfg, examples_for, setup


def _cache_logits(model, first_layer, batch):
    cache = PrefixCache(model, first_layer, rank=0, world_size=1, device=torch.device("cpu"))
    inputs = collate(batch, pad_id=0)
    with torch.no_grad():
        hidden = cache._prefix_hidden(model, inputs)
        return head_logits(model, cache._suffix_hidden(model, hidden, inputs)), inputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_partial_forward_equals_the_full_forward(tiny_tokenizer, dtype):
    model = make_random_llama(len(tiny_tokenizer), seed=3, num_layers=4).to(dtype)
    batch = examples_for(tiny_tokenizer, n=6)  # different lengths: right padding inside the batch
    partial, inputs = _cache_logits(model, 2, batch)
    with torch.no_grad():
        full = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    real = inputs["attention_mask"].bool()
    assert len({len(e.input_ids) for e in batch}) > 1
    diff = (full.float() - partial.float()).abs()[real].max().item()
    assert diff <= (1e-5 if dtype == torch.float32 else 2e-2 * full.float().abs().max().item())


def with_augmented_losses(examples):
    """Every third example weighted, every other one a KL locality example (top-3 soft targets)."""
    out = []
    for i, e in enumerate(examples):
        if i % 2:
            rows = torch.tensor([[1, 2 + i, 5]] * e.num_target_tokens)
            e = dataclasses.replace(e, soft_ids=rows, soft_probs=torch.tensor([[0.5, 0.3, 0.2]] * len(rows)))
        out.append(dataclasses.replace(e, weight=3.0) if i % 3 == 0 else e)
    return out


@pytest.mark.parametrize("augmented", [False, True], ids=["edits", "weighted-and-kl"])
def test_training_with_the_cache_equals_training_without(tiny_tokenizer, caplog, augmented):
    examples = examples_for(tiny_tokenizer, n=10)
    if augmented:  # locality supervision's examples take the same loss through the cache
        examples = with_augmented_losses(examples)
    deltas, layer0_calls = {}, {}
    for on in (False, True):
        model, trainable = setup(tiny_tokenizer, layers=(-1,))
        before = {n: p.detach().clone() for n, p in trainable}
        calls = []
        model.model.layers[0].register_forward_hook(lambda m, a, o, calls=calls: calls.append(a[0].shape[0]))
        with caplog.at_level(logging.INFO):
            result = train_breadth_first(
                model, examples, SingleProcess("cpu"), cfg(epochs=4, prefix_cache=on), pad_id=0
            )
        deltas[on] = {n: p.detach() - before[n] for n, p in trainable}
        layer0_calls[on] = sum(calls)
        assert result.epochs[0].num_tokens == sum(len(e.input_ids) for e in examples)
        assert result.epochs[0].num_padded_tokens >= result.epochs[0].num_tokens
    assert "prefix cache: 10 edits" in caplog.text
    assert layer0_calls[False] == 4 * len(examples)
    assert layer0_calls[True] == len(examples) + 8  # self-check: 4 edits, both paths
    for name, delta in deltas[False].items():
        assert delta.abs().max() > 1e-4
        torch.testing.assert_close(deltas[True][name], delta, atol=1e-6, rtol=0)


def test_first_trainable_layer(tiny_tokenizer):
    model, _ = setup(tiny_tokenizer, layers=(1, 2))
    assert first_trainable_layer(model) == 1
    model.lm_head.weight.requires_grad_(True)
    assert first_trainable_layer(model) is None


def test_an_architecture_that_cannot_run_partially_falls_back(caplog):
    from transformers import GPT2Config, GPT2LMHeadModel

    from locft_dist.edits.encode import EncodedExample
    from locft_dist.locate import freeze_all_but, resolve_location

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=3, n_head=4))
    freeze_all_but(model, resolve_location(model, [-1], ["mlp.down_proj"]).parameter_names)
    examples = [EncodedExample(tuple(range(1, 6 + i % 3)), 3) for i in range(6)]
    with caplog.at_level(logging.WARNING):
        result = train_breadth_first(model, examples, SingleProcess("cpu"), cfg(epochs=2), pad_id=0)
    assert "prefix cache disabled" in caplog.text  # GPT-2 adds position embeddings to inputs_embeds
    assert len(result.epoch_losses) == 2


def test_modulo_ownership_covers_each_edit_once_with_equal_pass_counts():
    lengths = [5 + (i * 7) % 11 for i in range(40)]
    batch = list(range(3, 40, 2))
    for modulo in (False, True):
        per_rank = [rank_chunks(batch, r, 3, 2, lengths, modulo_owner=modulo) for r in range(3)]
        assert len({len(chunks) for chunks in per_rank}) == 1
        real = sorted(i for chunks in per_rank for c, w in chunks if w for i in c)
        assert real == sorted(batch)
        if modulo:
            assert all(i % 3 == r for r, chunks in enumerate(per_rank) for c, _ in chunks for i in c)
    chunks = length_sorted_chunks(batch, lengths, 4)
    assert [lengths[i] for c in chunks for i in c] == sorted(lengths[i] for i in batch)


def _layer0_passes(model) -> list[int]:
    calls: list[int] = []
    model.model.layers[0].register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    return calls


def test_the_epochs_remaining_decide_whether_the_cache_is_built(tiny_tokenizer, caplog):
    """A resume with one epoch (or nothing) left runs no fill; with more, the cache is built. Either way the
    run ends where an uninterrupted one does (same ownership, so the same split of every batch)."""
    examples = examples_for(tiny_tokenizer, n=10)
    model, trainable = setup(tiny_tokenizer, layers=(-1,))
    train_breadth_first(model, examples, SingleProcess("cpu"), cfg(epochs=4), pad_id=0)
    uninterrupted = {n: p.detach().clone() for n, p in trainable}

    model, trainable = setup(tiny_tokenizer, layers=(-1,))
    strategy = SingleProcess("cpu")
    optimizer = strategy.build_optimizer(model, cfg())
    sampler = BreadthFirstSampler(len(examples), 4, 0)
    kwargs = {"pad_id": 0, "sampler": sampler, "optimizer": optimizer}
    train_breadth_first(model, examples, strategy, cfg(epochs=3), **kwargs)
    for epochs_left in (1, 0):
        calls = _layer0_passes(model)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            result = train_breadth_first(model, examples, strategy, cfg(epochs=4), **kwargs)
        assert "prefix cache: 10 edits" not in caplog.text
        assert f"{epochs_left * len(examples)} edit passes remain" in caplog.text
        assert sum(calls) == epochs_left * len(examples)  # the uncached passes only: no fill, no self-check
        assert len(result.epochs) == epochs_left
    for name, param in trainable:
        torch.testing.assert_close(param.detach(), uninterrupted[name], atol=1e-6, rtol=0)

    model, _ = setup(tiny_tokenizer, layers=(-1,))
    calls = _layer0_passes(model)
    sampler = BreadthFirstSampler(len(examples), 4, 0, consumed=2 * len(examples))  # two epochs left
    train_breadth_first(model, examples, SingleProcess("cpu"), cfg(epochs=4), pad_id=0, sampler=sampler)
    assert sum(calls) == len(examples) + 8  # the fill and the self-check, then cached passes only


def test_the_device_budget_defaults_to_a_share_of_free_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (6 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 1 * 2**30)
    cuda = torch.device("cuda", 0)
    assert device_budget_bytes(cuda, None) == int(DEVICE_FREE_FRACTION * 8 * 2**30)
    assert device_budget_bytes(cuda, 1.5) == int(1.5 * 2**30)
    assert device_budget_bytes(torch.device("cpu"), None) is None  # all rows in host memory


def test_the_fill_runs_its_longest_chunk_first(tiny_tokenizer):
    """Longest first: the memory pool grows once, to the largest activations (a GPU's one-time cost)."""
    examples = examples_for(tiny_tokenizer, n=12)
    model, _ = setup(tiny_tokenizer, layers=(-1,))
    widths = []
    model.model.layers[0].register_forward_hook(lambda m, a, o: widths.append(a[0].shape[1]))
    cache = PrefixCache(model, 2, rank=0, world_size=1, device=torch.device("cpu"))
    assert cache.fill(model, examples, pad_id=0, micro=3, check=lambda bad: bad)
    fill_widths = widths[2:]  # after the self-check's two passes
    assert len(set(fill_widths)) > 1 and fill_widths == sorted(fill_widths, reverse=True)
