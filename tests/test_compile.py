"""train.compile: the layers training runs are compiled while it runs and give the eager run's weights."""

import pytest
import torch

from locft_dist.config import ConfigError, RunConfig, validate
from locft_dist.locate import find_decoder_layers
from locft_dist.parallel.single import SingleProcess
from locft_dist.trainer import train_breadth_first
from tests.test_trainer import cfg, examples_for, setup


def _train(tok, compile_layers: bool, calls: list[int] | None = None):
    model, trainable = setup(tok, layers=(-2,))
    layers = model.get_submodule(find_decoder_layers(model).layers_path)

    def hook(step, _sampler, _progress) -> None:  # which layers run compiled, mid-training
        if calls is not None:
            calls.append([layer._compiled_call_impl is not None for layer in layers])

    result = train_breadth_first(
        model, examples_for(tok), SingleProcess("cpu"), cfg(compile=compile_layers), 0, on_step_end=hook
    )
    return model, layers, {n: p.detach().clone() for n, p in trainable}, result


def test_compiled_training_matches_eager_and_compiles_only_while_training(tiny_tokenizer):
    _, _, eager, eager_result = _train(tiny_tokenizer, False)
    seen: list[list[bool]] = []
    _, layers, compiled, result = _train(tiny_tokenizer, True, seen)
    num_layers = len(layers)
    # from the first trainable layer (-2) up, during training; uncompiled again afterwards
    assert seen and all(s == [i >= num_layers - 2 for i in range(num_layers)] for s in seen)
    assert all(layer._compiled_call_impl is None for layer in layers)
    assert result.epoch_losses == pytest.approx(eager_result.epoch_losses, rel=1e-4)
    initial = {n: p.detach() for n, p in setup(tiny_tokenizer, layers=(-2,))[1]}
    for name, weight in eager.items():
        assert not torch.equal(weight, initial[name]), "training moved it"
        torch.testing.assert_close(compiled[name], weight, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_compile_is_refused_where_it_does_not_run(strategy):
    config = RunConfig()
    config.train.compile = True
    config.dist.strategy = strategy
    with pytest.raises(ConfigError, match=r"train\.compile"):
        validate(config)
