"""``train.fused_norm``: the fused RMSNorm computes the Llama formula, is swapped in only while training
runs, leaves other norms alone, and trains what the model's own norm trains."""

import importlib

import pytest
import torch
from torch import nn

from locft_dist.fused_norm import (
    FUSABLE_NORMS,
    fusable_norms,
    fused_norm_enabled,
    fused_rms_norm_forward,
    fused_rms_norms,
)
from locft_dist.parallel.single import SingleProcess
from locft_dist.trainer import train_breadth_first
from tests.conftest import make_random_llama
from tests.test_trainer import cfg, examples_for, setup


def norm_classes() -> list[type]:
    """Every class of ``FUSABLE_NORMS`` that the installed transformers defines."""
    found = []
    for name in sorted(FUSABLE_NORMS):
        family = name.removesuffix("RMSNorm").lower()
        module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        found.append(getattr(module, name))
    return found


DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    ),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls", norm_classes(), ids=lambda c: c.__name__)
def test_the_fused_forward_and_backward_equal_the_models_own(cls, dtype, device):
    """On a GPU ``F.rms_norm`` runs its fused kernel; on CPU the same function (the CPU tests' path)."""
    torch.manual_seed(0)
    norm = cls(64, eps=1e-5).to(device=device, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64) * 0.5 + 1)
    x = (torch.randn(3, 7, 64) * 3).to(device=device, dtype=dtype)
    results = []
    for forward in (cls.forward, fused_rms_norm_forward):
        norm.zero_grad(set_to_none=True)
        inputs = x.clone().requires_grad_(True)
        out = forward(norm, inputs)
        out.float().square().sum().backward()
        results.append((out.detach(), inputs.grad, norm.weight.grad))
    (own_out, own_dx, own_dw), (fused_out, fused_dx, fused_dw) = results
    assert fused_out.dtype == own_out.dtype == dtype
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(fused_out, own_out, **tol)
    torch.testing.assert_close(fused_dx, own_dx, **tol)
    torch.testing.assert_close(fused_dw, own_dw, **tol)
    if dtype == torch.float32:  # the same formula: the outputs differ at most by float32 rounding
        assert (fused_out - own_out).abs().max() < 1e-5


def test_only_known_classes_are_swapped_and_only_within_the_block(tiny_tokenizer):
    class GemmaStyleRMSNorm(nn.Module):  # another formula under a similar name: left alone
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(8))
            self.variance_epsilon = 1e-6

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * (1 + self.weight)

    tiny_model = make_random_llama(len(tiny_tokenizer))
    tiny_model.extra_norm = GemmaStyleRMSNorm()
    norms = fusable_norms(tiny_model)
    layers = tiny_model.config.num_hidden_layers
    assert len(norms) == 2 * layers + 1  # two per layer and the final norm
    assert tiny_model.extra_norm not in norms
    with fused_rms_norms(tiny_model, enabled=True):
        assert all(norm.forward.__func__ is fused_rms_norm_forward for norm in norms)
        assert "forward" not in vars(tiny_model.extra_norm)
    assert all("forward" not in vars(norm) for norm in norms)  # the class's own forward again
    with fused_rms_norms(tiny_model, enabled=False):
        assert all("forward" not in vars(norm) for norm in norms)


def test_null_means_on_a_gpu_only():
    assert fused_norm_enabled(None, "cuda:0") and not fused_norm_enabled(None, "cpu")
    assert fused_norm_enabled(True, "cpu") and not fused_norm_enabled(False, "cuda")


def test_training_with_the_fused_norm_equals_training_with_the_models_own(tiny_tokenizer):
    """The trainer's whole path (prefix-cache fill, cached passes from layer 1, backward) with and without."""
    examples = examples_for(tiny_tokenizer)
    runs = {}
    for fused in (False, True):
        model, trainable = setup(tiny_tokenizer, layers=(1,))
        before = {name: p.detach().clone() for name, p in trainable}
        result = train_breadth_first(model, examples, SingleProcess("cpu"), cfg(fused_norm=fused), pad_id=0)
        assert all("forward" not in vars(norm) for norm in fusable_norms(model))
        runs[fused] = ({name: p.detach() - before[name] for name, p in trainable}, result.epoch_losses)
    (own, own_losses), (fused, fused_losses) = runs[False], runs[True]
    for name, delta in own.items():
        assert delta.abs().max() > 1e-4  # it trained
        torch.testing.assert_close(fused[name], delta, atol=1e-5, rtol=1e-4)
    assert fused_losses == pytest.approx(own_losses, rel=1e-5)
