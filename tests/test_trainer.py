import pytest
import torch

from locft_dist.config import TrainConfig
from locft_dist.edits.encode import encode_pair
from locft_dist.locate import freeze_all_but, resolve_location
from locft_dist.optim import build_optimizer
from locft_dist.parallel.single import SingleProcess
from locft_dist.trainer import train_breadth_first, train_depth_first
from tests.conftest import SENTENCES, make_random_llama


def examples_for(tok, n=12):
    pairs = []
    for i in range(n):
        words = SENTENCES[i % len(SENTENCES)].split()
        pairs.append((" ".join(words[:-1]) + f" {i}", words[-1]))
    return [encode_pair(tok, p, t) for p, t in pairs]


def setup(tok, layers=(-1,), modules=("mlp.down_proj",)):
    model = make_random_llama(len(tok), seed=1)
    location = resolve_location(model, list(layers), list(modules))
    trainable = freeze_all_but(model, location.parameter_names)
    return model, trainable


def cfg(**kw):
    base = {"epochs": 3, "batch_size": 4, "lr": 1e-2, "early_stop_loss": None, "progress": False}
    return TrainConfig(**(base | kw))


def trained_params(tok, train_cfg, **setup_kw):
    model, trainable = setup(tok, **setup_kw)
    result = train_breadth_first(model, examples_for(tok), SingleProcess("cpu"), train_cfg, pad_id=0)
    return model, {n: p.detach().clone() for n, p in trainable}, result


def test_only_localized_parameters_change(tiny_tokenizer):
    model, trainable = setup(tiny_tokenizer)
    names = {n for n, _ in trainable}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_breadth_first(model, examples_for(tiny_tokenizer), SingleProcess("cpu"), cfg(), pad_id=0)
    for name, param in model.named_parameters():
        if name in names:
            assert not torch.equal(param, before[name]), name
        else:
            assert torch.equal(param, before[name]), f"frozen parameter {name} changed"


def test_optimizer_state_exists_for_localized_parameters_only(tiny_tokenizer):
    model, trainable = setup(tiny_tokenizer, layers=(0, -1))
    params = [p for _, p in trainable]
    optimizer = build_optimizer(params, cfg())
    train_breadth_first(
        model, examples_for(tiny_tokenizer), SingleProcess("cpu"), cfg(), pad_id=0, optimizer=optimizer
    )
    assert {id(p) for p in optimizer.state} == {id(p) for p in params}
    assert len(optimizer.state) == 2
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert all(p.grad is None for p in frozen)


def test_same_seed_same_result_and_other_seed_differs(tiny_tokenizer):
    _, a, ra = trained_params(tiny_tokenizer, cfg(seed=5))
    _, b, rb = trained_params(tiny_tokenizer, cfg(seed=5))
    _, c, _ = trained_params(tiny_tokenizer, cfg(seed=6))
    for name in a:
        assert torch.equal(a[name], b[name])
        assert not torch.equal(a[name], c[name])
    assert [e.mean_loss for e in ra.epochs] == [e.mean_loss for e in rb.epochs]


def test_gradient_accumulation_matches_the_full_batch(tiny_tokenizer):
    _, full, _ = trained_params(tiny_tokenizer, cfg())
    _, accumulated, _ = trained_params(tiny_tokenizer, cfg(micro_batch_size=1))
    for name in full:
        torch.testing.assert_close(full[name], accumulated[name], atol=1e-5, rtol=1e-4)


def test_loss_falls_and_early_stop_ends_the_run(tiny_tokenizer):
    _, _, probe = trained_params(tiny_tokenizer, cfg(epochs=2, lr=3e-2), modules=("*",))
    threshold = probe.epochs[0].mean_loss * 0.97
    _, _, result = trained_params(
        tiny_tokenizer, cfg(epochs=40, lr=3e-2, early_stop_loss=threshold), modules=("*",)
    )
    losses = [e.mean_loss for e in result.epochs]
    assert losses[-1] < losses[0]
    assert result.stopped_early and losses[-1] < threshold and len(losses) < 40


def test_skip_threshold_skips_steps(tiny_tokenizer):
    model, trainable = setup(tiny_tokenizer)
    before = {n: p.detach().clone() for n, p in trainable}
    result = train_breadth_first(
        model, examples_for(tiny_tokenizer), SingleProcess("cpu"), cfg(skip_loss_below=1e9), pad_id=0
    )
    assert all(e.num_skipped_steps == e.num_steps for e in result.epochs)
    assert all(torch.equal(p, before[n]) for n, p in trainable)


def test_lr_schedule_reaches_zero(tiny_tokenizer):
    model, _ = setup(tiny_tokenizer)
    from locft_dist.runlog import RunLog

    class Capture(RunLog):
        def __init__(self):
            super().__init__(None)
            self.lrs = []

        def event(self, kind, **fields):
            if kind == "step":
                self.lrs.append(fields["lr"])

    log = Capture()
    train_breadth_first(
        model,
        examples_for(tiny_tokenizer),
        SingleProcess("cpu"),
        cfg(lr_schedule="linear", warmup_steps=2),
        pad_id=0,
        run_log=log,
    )
    assert log.lrs[:2] == pytest.approx([5e-3, 1e-2])  # two warmup steps
    assert log.lrs[-1] < log.lrs[2] and log.lrs[-1] == pytest.approx(1e-2 / (len(log.lrs) - 2))
    assert max(log.lrs) == pytest.approx(1e-2)


def test_depth_first_visits_every_edit_with_a_step_budget(tiny_tokenizer):
    model, _ = setup(tiny_tokenizer)
    examples = examples_for(tiny_tokenizer)
    result = train_depth_first(
        model,
        examples,
        SingleProcess("cpu"),
        cfg(depth_first_max_steps=3, depth_first_stop_loss=0.0),
        pad_id=0,
    )
    assert result.num_edit_passes == 3 * len(examples)
    assert result.num_steps == 3 * len(examples)


class _Steps:
    """A run-log sink that keeps the step events."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def event(self, kind: str, record: dict) -> None:
        if kind == "step":
            self.records.append(record)

    def close(self) -> None:
        return None


def _logged_run(tok, train_cfg):
    from locft_dist.runlog import RunLog

    model, trainable = setup(tok)
    sink, log = _Steps(), RunLog(None)
    log.add_sink(sink)
    seen = []

    def hook(step, sampler, progress) -> None:
        seen.append((step, sampler.consumed, progress.num_edit_passes, len(progress.epoch_losses)))

    result = train_breadth_first(
        model, examples_for(tok), SingleProcess("cpu"), train_cfg, 0, run_log=log, on_step_end=hook
    )
    return sink.records, seen, result, {n: p.detach().clone() for n, p in trainable}


def test_deferred_step_bookkeeping_reports_each_step_as_it_stood(tiny_tokenizer):
    """Without ``skip_loss_below`` a step's loss is read, logged and handed to the hook after the next
    step's passes are queued; the hook still sees the sampler and progress as they were after that step,
    and every logged loss equals the one read at once (``skip_loss_below`` below any loss reads at once)."""
    deferred = _logged_run(tiny_tokenizer, cfg(epochs=2, batch_size=5))  # 12 edits: steps of 5, 5, 2
    at_once = _logged_run(tiny_tokenizer, cfg(epochs=2, batch_size=5, skip_loss_below=-1.0))
    records, seen, result, weights = deferred
    assert [r["step"] for r in records] == list(range(1, 7))
    assert [(r["step"], r["loss"], r["tokens"]) for r in records] == [
        (r["step"], r["loss"], r["tokens"]) for r in at_once[0]
    ]
    assert seen == at_once[1]
    consumed = [5, 10, 12, 17, 22, 24]
    assert [s[1] for s in seen] == consumed and [s[2] for s in seen] == consumed
    assert [s[3] for s in seen] == [0, 0, 1, 1, 1, 2]  # an epoch's mean loss once its last step is in
    assert result.epoch_losses == at_once[2].epoch_losses
    for name, weight in weights.items():
        assert torch.equal(weight, at_once[3][name]), name
