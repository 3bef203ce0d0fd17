"""Logits at chosen positions equal the full forward's logits there."""

from __future__ import annotations

import torch

from locft_dist.edits.encode import collate, encode_pairs
from locft_dist.logits import chunked_head_logits, final_hidden, head_logits, target_positions
from tests.conftest import make_random_llama


def test_target_logits_match_the_full_forward(tiny_tokenizer):
    model = make_random_llama(len(tiny_tokenizer))
    examples = encode_pairs(
        tiny_tokenizer, ["Kesso Varn works as a", "Dorn Asket plays the"], ["glassblower", "violin"]
    )
    batch = collate(examples, pad_id=0)
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    hidden = final_hidden(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    rows, cols = target_positions(batch["labels"])
    assert len(rows) == sum(e.num_target_tokens for e in examples)
    picked = head_logits(model, hidden[rows, cols])
    torch.testing.assert_close(picked, full[rows, cols], rtol=0, atol=1e-5)
    chunks = chunked_head_logits(model, hidden[rows, cols], max_elements=len(tiny_tokenizer) * 2)
    assert len(chunks) == (len(rows) + 1) // 2
    torch.testing.assert_close(torch.cat(chunks), picked, rtol=0, atol=1e-6)
    # the labels one position to the right are what those logits predict
    assert torch.equal(batch["labels"][rows, cols + 1], batch["input_ids"][rows, cols + 1])


def test_final_hidden_from_embeddings_keeps_gradients(tiny_tokenizer):
    model = make_random_llama(len(tiny_tokenizer))
    ids = torch.tensor([[1, 5, 6, 7]])
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    hidden = final_hidden(model, inputs_embeds=embeds)
    torch.testing.assert_close(
        head_logits(model, hidden), model(inputs_embeds=embeds).logits, rtol=0, atol=1e-5
    )
    head_logits(model, hidden[0, -1]).sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
