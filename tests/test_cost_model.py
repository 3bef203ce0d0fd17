"""The shape table counts what Hugging Face builds; the memory model's after-layout never needs more."""

import pytest
import torch

from locft_dist.cost_model import SHAPES, Workload, flops, main, memory_per_rank


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shapes_count_the_parameters_transformers_builds(name):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = SHAPES[name]
    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        tie_word_embeddings=shape.tied_embeddings,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == shape.total_params
    assert sum(p.numel() for p in model.model.layers[0].parameters()) == shape.block_params
    assert model.model.layers[0].mlp.down_proj.weight.numel() == shape.down_params


def test_after_layout_needs_no_more_memory_and_locft_fewer_flops():
    for name in ("llama3-8b", "qwen2.5-72b"):
        work = Workload(layer=SHAPES[name].layers - 10)
        before = memory_per_rank(SHAPES[name], work, layout="before")
        after = memory_per_rank(SHAPES[name], work, layout="after")
        assert before.keys() == after.keys()
        assert all(after[k] <= before[k] + 1e-12 for k in before)
        assert after["logits fp32"] < before["logits fp32"] / 4  # 4 target tokens of 20
        assert after["delta export, ranks 1..W-1"] == 0
        locft, naive = flops(SHAPES[name], work)
        assert locft < naive / 2  # ten of 32 (8B) or 80 layers every epoch, the prefix once


def test_the_module_prints_the_tables(capsys):
    main([])
    out = capsys.readouterr().out
    assert "| llama3-8b |" in out and "qwen2.5-72b: 72.7B params" in out and "total while training" in out
    assert "FSDP communication" in out
