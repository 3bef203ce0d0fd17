"""Reusing the unedited pass's frozen prefix gives the edited model's full-forward results exactly."""

from __future__ import annotations

import pytest
import torch

from locft_dist.eval import EvalSettings, Evaluator
from locft_dist.eval.prefix import PrefixReuse
from locft_dist.locate import freeze_all_but
from tests.eval_fixtures import tiny_llama, word_tokenizer
from tests.test_eval_metrics import REQUESTS

pytestmark = pytest.mark.filterwarnings("error::FutureWarning")


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


def _edit(model) -> None:
    """Change the trainable (layer 2) weights, as training would."""
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.5)


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("generation", [False, True])
@pytest.mark.parametrize("budget", [2**30, 6000])  # everything recorded / only some batches
def test_the_edited_pass_from_recorded_states_equals_the_full_forward(tokenizer, generation, budget):
    torch.manual_seed(0)
    model = tiny_llama(tokenizer, num_layers=3)
    freeze_all_but(model, ["model.layers.2.mlp.down_proj.weight"])
    settings = EvalSettings(batch_size=2, generation=generation, max_new_tokens=6)
    evaluator = Evaluator(tokenizer, REQUESTS, settings=settings)
    prefix = PrefixReuse.for_model(model, evaluator.ranks, budget)
    assert prefix is not None and prefix.first_layer == 2
    reference, _ = evaluator.unedited(model, forward=prefix)
    assert 0 < prefix.num_recorded <= 5  # 9 probes in batches of 2
    if budget < 2**30:
        assert prefix.num_recorded < 5
    _edit(model)
    layer0 = _count_calls(model.model.layers[0])
    full_outputs = evaluator.run(model)
    full_calls = layer0[0]
    prefix.replay()
    reused_outputs = evaluator.run(model, forward=prefix)
    assert [o.predicted for o in reused_outputs] == [o.predicted for o in full_outputs]
    assert [o.generated for o in reused_outputs] == [o.generated for o in full_outputs]
    # the lower layers ran once per batch less for every replayed batch (decoding still runs them)
    assert full_calls - (layer0[0] - full_calls) == sum(prefix.usable)
    full = evaluator.metrics(full_outputs, reference, torch.device("cpu"))
    reused = evaluator.metrics(reused_outputs, reference, torch.device("cpu"))
    assert reused == full
    assert full.reliability_tf < 1.0 or full.locality_tf < 1.0  # the edit changed something


def test_no_reuse_without_a_frozen_prefix(tokenizer):
    model = tiny_llama(tokenizer, num_layers=2)
    freeze_all_but(model, ["model.layers.0.mlp.down_proj.weight"])
    assert PrefixReuse.for_model(model, Evaluator(tokenizer, REQUESTS).ranks, 2**30) is None
    freeze_all_but(model, ["model.layers.1.mlp.down_proj.weight"])
    assert PrefixReuse.for_model(model, Evaluator(tokenizer, REQUESTS).ranks, 0) is None


def test_cropping_a_partly_filled_cache_shortens_only_the_filled_layers():
    """The edited pass's partial forward fills the layers from the first trainable one up; the layers below
    are filled from the records after the crop (transformers 5.0-5.17 fail on cropping an empty layer)."""
    from transformers import DynamicCache

    from locft_dist.eval.generate import crop_filled_layers

    cache = DynamicCache()
    keys = torch.randn(2, 1, 6, 4)
    cache.update(keys, keys + 1, 2)
    crop_filled_layers(cache, 2)
    assert cache.layers[2].keys.shape[2] == 4 and torch.equal(cache.layers[2].values, keys[:, :, :4] + 1)
    assert all(getattr(layer, "keys", None) is None or layer.keys.numel() == 0 for layer in cache.layers[:2])
    lower = torch.randn(2, 1, 4, 4)
    cache.update(lower, lower, 0)
    assert cache.layers[0].keys.shape[2] == cache.layers[2].keys.shape[2]
