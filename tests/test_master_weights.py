"""bf16 in one process: fp32 master weights and optimizer state, so small updates are not rounded away."""

import pytest
import torch

from locft_dist.config import LocateConfig, ModelConfig, TrainConfig
from locft_dist.delta import compute_delta, read_base_tensors
from locft_dist.edits.encode import encode_pairs
from locft_dist.parallel.single import SingleProcess
from locft_dist.trainer import train_breadth_first
from tests.conftest import SENTENCES

LR = 1e-5
"""Small enough that most bf16 weights do not move: |w| ~ 0.016 changes only for a step above ~3e-5."""
STEPS = 6


def _examples(tokenizer):
    prompts = [s.rsplit(" ", 1)[0] for s in SENTENCES]
    answers = [s.rsplit(" ", 1)[1] for s in SENTENCES[1:] + SENTENCES[:1]]  # counterfactual answers
    return encode_pairs(tokenizer, prompts, answers)


def _run(model_dir, tokenizer, dtype: str):
    strategy = SingleProcess("cpu")
    model, location = strategy.load_model(
        ModelConfig(path=str(model_dir), dtype=dtype), LocateConfig(layers=[-1], modules=["mlp.down_proj"])
    )
    base = read_base_tensors(str(model_dir), location.parameter_names)
    start = compute_delta(strategy.gather_trainable(model), base)
    cfg = TrainConfig(lr=LR, batch_size=len(SENTENCES), epochs=STEPS, early_stop_loss=None, progress=False)
    optimizer = strategy.build_optimizer(model, cfg)
    train_breadth_first(
        model, _examples(tokenizer), strategy, cfg, tokenizer.eos_token_id, optimizer=optimizer
    )
    delta = compute_delta(strategy.gather_trainable(model), base)
    return model, optimizer, start, delta, base


def _bf16_stepped_directly(model_dir, tokenizer) -> torch.Tensor:
    """What a bf16 run without master weights changes: the same training on the bf16 parameter itself."""
    from locft_dist.locate import freeze_all_but, resolve_location
    from locft_dist.model import load_model

    model = load_model(model_dir, dtype="bfloat16")
    names = resolve_location(model, [-1], ["mlp.down_proj"]).parameter_names
    freeze_all_but(model, names)
    param = dict(model.named_parameters())[names[0]]
    before = param.detach().clone()
    cfg = TrainConfig(lr=LR, batch_size=len(SENTENCES), epochs=STEPS, early_stop_loss=None, progress=False)
    train_breadth_first(model, _examples(tokenizer), SingleProcess("cpu"), cfg, tokenizer.eos_token_id)
    assert param.dtype == torch.bfloat16
    return param.detach().float() - before.float()


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tiny_tokenizer):
    out = {dtype: _run(tiny_model_dir, tiny_tokenizer, dtype) for dtype in ("bfloat16", "float32")}
    out["naive"] = _bf16_stepped_directly(tiny_model_dir, tiny_tokenizer)
    return out


def test_trainable_tensors_and_optimizer_state_are_fp32_the_rest_bf16(runs):
    model, optimizer, *_ = runs["bfloat16"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"model.layers.2.mlp.down_proj.weight"}
    for name, param in model.named_parameters():
        assert param.dtype == (torch.float32 if name in trainable else torch.bfloat16), name
    states = list(optimizer.state.values())
    assert states and all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32 for s in states)


def test_the_master_starts_at_the_exact_fp32_base(runs):
    _, _, start, _, base = runs["bfloat16"]
    name = next(iter(base))
    assert not torch.equal(base[name].bfloat16().float(), base[name]), "the base must not be bf16-exact"
    assert all(torch.count_nonzero(d) == 0 for d in start.values())  # no rounding error in the delta


def test_small_updates_land_in_the_master_and_match_an_fp32_run(runs):
    _, _, _, delta, base = runs["bfloat16"]
    _, _, _, reference, _ = runs["float32"]
    name = next(iter(base))
    moved, want, naive = delta[name], reference[name], runs["naive"]
    # Stepping the bf16 weights themselves rounds most updates away:
    assert (naive == 0).float().mean() > 0.8 and naive.abs().mean() < 0.3 * moved.abs().mean()
    assert (moved != 0).float().mean() > 0.99
    assert moved.abs().mean() > 0.5 * LR * STEPS  # Adam moves every weight by ~lr a step
    # bf16 activations change the gradients a little, not the update: same direction and size.
    cosine = torch.nn.functional.cosine_similarity(moved.flatten(), want.flatten(), dim=0)
    assert cosine > 0.95
    assert abs(moved.norm() / want.norm() - 1) < 0.05


def _cast_for_matmul_run(model_dir, tokenizer):
    """The GPU recipe (``cast_for_matmul``: the linear layer's matmul in bf16 from a cast of its fp32
    master), run on CPU: the same code path at small size."""
    from locft_dist.locate import freeze_all_but, resolve_location
    from locft_dist.model import load_model
    from locft_dist.parallel.master_weights import keep_fp32_master

    model = load_model(model_dir, dtype="bfloat16")
    names = resolve_location(model, [-1], ["mlp.down_proj"]).parameter_names
    freeze_all_but(model, names)
    assert keep_fp32_master(model, model_dir, cast_for_matmul=True) == ["model.layers.2.mlp.down_proj"]
    strategy = SingleProcess("cpu")
    cfg = TrainConfig(lr=LR, batch_size=len(SENTENCES), epochs=STEPS, early_stop_loss=None, progress=False)
    optimizer = strategy.build_optimizer(model, cfg)
    base = read_base_tensors(str(model_dir), names)
    examples = _examples(tokenizer)
    train_breadth_first(model, examples, strategy, cfg, tokenizer.eos_token_id, optimizer=optimizer)
    return optimizer, compute_delta(strategy.gather_trainable(model), base)


def test_cast_for_matmul_computes_in_bf16_from_the_fp32_master(tiny_model_dir):
    from locft_dist.locate import freeze_all_but
    from locft_dist.model import load_model
    from locft_dist.parallel.master_weights import keep_fp32_master

    model = load_model(tiny_model_dir, dtype="bfloat16")
    name = "model.layers.2.mlp.down_proj"
    freeze_all_but(model, [f"{name}.weight"])
    keep_fp32_master(model, tiny_model_dir, cast_for_matmul=True)
    module = model.get_submodule(name)
    assert module.weight.dtype == torch.float32 and isinstance(module, torch.nn.Linear)
    x = torch.randn(3, module.in_features, dtype=torch.bfloat16, requires_grad=True)
    out = module(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, torch.nn.functional.linear(x, module.weight.detach().bfloat16()))
    out.float().square().sum().backward()
    assert module.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    assert f"{name}.weight" in model.state_dict()  # the swap keeps names and state dict


def test_cast_for_matmul_updates_match_an_fp32_run(runs, tiny_model_dir, tiny_tokenizer):
    optimizer, delta = _cast_for_matmul_run(tiny_model_dir, tiny_tokenizer)
    states = list(optimizer.state.values())
    assert states and all(s["exp_avg"].dtype == torch.float32 for s in states)
    _, _, _, reference, _ = runs["float32"]
    name = next(iter(reference))
    moved, want = delta[name], reference[name]
    assert (moved != 0).float().mean() > 0.99  # small updates still land in the master
    cosine = torch.nn.functional.cosine_similarity(moved.flatten(), want.flatten(), dim=0)
    assert cosine > 0.95
    assert abs(moved.norm() / want.norm() - 1) < 0.05
