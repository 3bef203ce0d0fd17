"""Paired decoding: the unedited model's locality generations decoded beside the edited model's (its
weights swapped in) give the metrics of the Reference decoded to the end before editing, with less work."""

from __future__ import annotations

import pytest
import torch

from locft_dist.eval import EvalSettings, Evaluator
from locft_dist.eval.base_weights import BaseWeights
from locft_dist.eval.prefix import PrefixReuse
from locft_dist.eval.reference import load_reference, save_reference
from locft_dist.locate import freeze_all_but
from tests.eval_fixtures import tiny_llama, word_tokenizer
from tests.test_eval_metrics import REQUESTS

pytestmark = pytest.mark.filterwarnings("error::FutureWarning")

TRAINABLE = ["model.layers.2.mlp.down_proj.weight"]


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


def _edit(model, scale: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in TRAINABLE:
                param.add_(torch.randn(param.shape, generator=generator) * scale)


def _layer_calls(model) -> list[int]:
    calls = [0]
    model.model.layers[0].register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("reuse", [False, True])
@pytest.mark.parametrize("scale", [0.0, 0.05, 0.5, 3.0])  # unchanged .. generations that part at once
@pytest.mark.parametrize("seed", [0, 1])
def test_paired_locality_equals_the_reference_decoded_before_editing(tokenizer, scale, seed, reuse):
    torch.manual_seed(seed)
    model = tiny_llama(tokenizer, num_layers=3)
    freeze_all_but(model, TRAINABLE)
    settings = EvalSettings(batch_size=3, generation=True, max_new_tokens=8)
    evaluator = Evaluator(tokenizer, REQUESTS, settings=settings)
    full_reference, full_before = evaluator.unedited(model)
    base = BaseWeights(model, TRAINABLE)
    prefix = PrefixReuse.for_model(model, evaluator.ranks, 2**30) if reuse else None
    deferred, before = evaluator.unedited(model, forward=prefix, defer_locality_generation=True)
    assert deferred.deferred and deferred.generated is None
    assert deferred.predicted == full_reference.predicted
    assert before.to_dict() == full_before.to_dict()  # the unedited model's own metrics as before

    _edit(model, scale, seed)
    stored = evaluator.edited(model, full_reference)
    if prefix is not None:
        prefix.replay()
    outputs = evaluator.run(model, deferred, forward=prefix, unedited_weights=base.swapped)
    paired = evaluator.metrics(outputs, deferred, torch.device("cpu"))
    assert paired.to_dict() == stored.to_dict()
    # the unedited side decoded exactly what the Reference holds, as far as it went
    locality = [(p, o) for p, o in zip(evaluator.probes.probes, outputs, strict=True) if p.kind == "locality"]
    assert locality
    for probe, output in locality:
        whole = full_reference.generated[probe.slot]
        assert output.other_generated == whole[: len(output.other_generated)]
    if scale == 0.0:  # identical weights: both sides decode every probe to its end
        assert all(o.other_generated == full_reference.generated[p.slot] for p, o in locality)
        assert paired.locality_wild == 1.0
    # and the weights are the edited ones again
    assert not torch.equal(model.model.layers[2].mlp.down_proj.weight, base.values[TRAINABLE[0]]) or not scale


def test_parting_generations_stop_early(tokenizer):
    """Where the edit changes every locality generation at once, the paired pass decodes far fewer steps
    than decoding the unedited model to the end of every probe."""
    torch.manual_seed(0)
    model = tiny_llama(tokenizer, num_layers=3)
    freeze_all_but(model, TRAINABLE)
    settings = EvalSettings(batch_size=16, generation=True, max_new_tokens=40)
    evaluator = Evaluator(tokenizer, REQUESTS, settings=settings)
    base = BaseWeights(model, TRAINABLE)
    calls = _layer_calls(model)
    full_reference, _ = evaluator.unedited(model)
    reference_calls = calls[0]
    deferred, _ = evaluator.unedited(model, defer_locality_generation=True)
    deferred_calls = calls[0] - reference_calls
    _edit(model, 3.0, 0)
    calls[0] = 0
    evaluator.edited(model, full_reference)
    stored_calls = calls[0]
    calls[0] = 0
    paired = evaluator.edited(model, deferred, unedited_weights=base.swapped)
    assert paired.locality_wild is not None and paired.locality_wild < 1.0
    assert deferred_calls + calls[0] < reference_calls + stored_calls


def test_a_deferred_reference_needs_the_unedited_weights(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = tiny_llama(tokenizer, num_layers=3)
    freeze_all_but(model, TRAINABLE)
    evaluator = Evaluator(tokenizer, REQUESTS, settings=EvalSettings(max_new_tokens=4))
    deferred, _ = evaluator.unedited(model, defer_locality_generation=True)
    deferred.key = "k"
    save_reference(tmp_path / "reference.safetensors", deferred)
    loaded = load_reference(tmp_path / "reference.safetensors", "k")
    assert loaded is not None and loaded.deferred and loaded.generated is None
    with pytest.raises(ValueError, match="unedited weights"):
        evaluator.edited(model, loaded)


def test_base_weights_come_back_after_the_block_even_on_error(tokenizer):
    model = tiny_llama(tokenizer, num_layers=3)
    freeze_all_but(model, TRAINABLE)
    base = BaseWeights(model, TRAINABLE)
    param = model.model.layers[2].mlp.down_proj.weight
    _edit(model, 1.0, 0)
    edited = param.detach().clone()
    with pytest.raises(RuntimeError, match="inside"), base.swapped():
        assert torch.equal(param, base.values[TRAINABLE[0]])
        raise RuntimeError("inside")
    assert torch.equal(param, edited)
    with pytest.raises(KeyError, match="no parameters named"):
        BaseWeights(model, ["model.layers.9.mlp.down_proj.weight"])
    param.data = param.data.double()
    with pytest.raises(ValueError, match="changed shape, dtype or device"), base.swapped():
        pass


def test_parted_and_settled_words_on_hand_made_generations():
    from locft_dist.eval.metrics import parted, settled_words

    assert settled_words("The Eiffel Tow", final=False) == ["eiffel"]  # "Tow" may still grow
    assert settled_words("The Eiffel Tow", final=True) == ["eiffel", "tow"]
    assert settled_words("Par", final=False) == []
    assert not parted(" Paris is", False, " Paris", False)  # one may still catch up with the other
    assert parted(" Paris is", False, " Paris", True)  # the finished one is already shorter
    assert parted(" Rome", False, " Paris", False)
    assert not parted(" Paris", True, " Paris", True)
    # EM normalizes: an article or case does not part two generations, a different word does
    a, b = settled_words("the Paris city ", False), settled_words("Paris City", True)
    assert not parted(a, False, b, True)
    assert parted(settled_words("Rome is ", False), False, settled_words("Paris is", True), True)


def test_only_a_trailing_partial_character_may_still_change():
    from locft_dist.eval.metrics import can_still_match, without_partial_character

    assert without_partial_character("Par\ufffd") == "Par"
    assert without_partial_character("\ufffd\ufffd\ufffd\ufffd") == "\ufffd"  # the first is final
    assert without_partial_character("a\ufffd\ufffdb") == "a\ufffd\ufffdb"
    assert can_still_match("\ufffd\ufffd", ["paris"])  # three byte-fallback bytes may become one letter
    assert not can_still_match("\ufffd\ufffd\ufffd\ufffd", ["paris"])
