"""train.prefix_cache_offload_prefix: the frozen prefix is freed during training, restored afterwards."""

import logging

import torch

from locft_dist.locate import freeze_all_but, resolve_location
from locft_dist.model import load_model
from locft_dist.parallel.single import SingleProcess
from locft_dist.trainer import train_breadth_first
from tests.test_trainer import cfg, examples_for


def _loaded(model_dir):
    model = load_model(str(model_dir), dtype="float32")
    trainable = freeze_all_but(model, resolve_location(model, [-1], ["mlp.down_proj"]).parameter_names)
    return model, trainable


def test_offloaded_prefix_trains_the_same_and_comes_back(tiny_tokenizer, tiny_model_dir, caplog):
    examples = examples_for(tiny_tokenizer, n=8)
    probe_ids = torch.tensor([examples[0].input_ids])
    runs = {}
    for offload in (False, True):
        model, trainable = _loaded(tiny_model_dir)
        base = {n: p.detach().clone() for n, p in model.named_parameters()}
        devices: list[set[str]] = []

        def watch(step, sampler, progress, model=model, devices=devices):
            prefix = [*model.model.layers[:2].parameters(), model.model.embed_tokens.weight]
            devices.append({p.device.type for p in prefix})

        with caplog.at_level(logging.INFO):
            train_breadth_first(
                model,
                examples,
                SingleProcess("cpu"),
                cfg(epochs=3, prefix_cache_offload_prefix=offload),
                pad_id=0,
                on_step_end=watch,
            )
        assert devices and all(d == ({"meta"} if offload else {"cpu"}) for d in devices), devices
        for name, param in model.named_parameters():  # the whole model is back, frozen parts unchanged
            assert param.device.type == "cpu", name
            if not param.requires_grad:
                assert torch.equal(param, base[name]), name
        with torch.no_grad():
            logits = model(input_ids=probe_ids).logits
        runs[offload] = ({n: p.detach().clone() for n, p in trainable}, logits)
    assert "frozen prefix modules freed" in caplog.text and "restored from" in caplog.text
    for name, tensor in runs[False][0].items():
        assert torch.equal(runs[True][0][name], tensor), name
    assert torch.equal(runs[True][1], runs[False][1])  # evaluation sees the same model


def test_a_model_not_loaded_from_safetensors_keeps_its_prefix(tiny_tokenizer, caplog):
    from tests.test_trainer import setup

    model, _ = setup(tiny_tokenizer)
    with caplog.at_level(logging.WARNING):
        train_breadth_first(
            model,
            examples_for(tiny_tokenizer, n=6),
            SingleProcess("cpu"),
            cfg(epochs=2, prefix_cache_offload_prefix=True),
            pad_id=0,
        )
    assert "prefix_cache_offload_prefix is ignored" in caplog.text
    assert all(p.device.type == "cpu" for p in model.parameters())
