"""DeepSpeed ZeRO under torchrun, the deepspeed launcher and accelerate: 2 ranks over gloo on CPU.

The same edits as one process and as FSDP2 give the same delta; the prefix cache gives the uncached
result; kill-and-resume (with the cache) is exact; only the localized parameters have optimizer state;
preemption saves and exits with the distinct code.
"""

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

from locft_dist.config import load_config
from locft_dist.edits import write_jsonl
from locft_dist.errors import ConfigError
from locft_dist.eval.metrics import METRIC_KEYS
from locft_dist.parallel.deepspeed import resolve_deepspeed_config
from locft_dist.run.signals import EXIT_PREEMPTED
from tests.conftest import REPO, free_port
from tests.test_distributed import (
    ENV,
    EPOCHS,
    KILL_BY,
    NUM_EDITS,
    copy_run,
    delta,
    edit_args,
    kill9,
    run,
    start,
    wait_for_step,
    workers,
)

ZERO3 = [f"dist.deepspeed_config={REPO / 'deepspeed_configs' / 'zero3.json'}", "dist.strategy=deepspeed"]


@pytest.fixture(scope="module")
def setup(world_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deepspeed")
    edits = tmp / "edits.jsonl"
    write_jsonl(world_model.world.make_edits(NUM_EDITS, seed=2), edits)
    # Every run uses the prefix cache (the default): the same fixed edit ownership on every strategy, so
    # the per-rank sums are formed alike. test_zero3_prefix_cache_equals_the_uncached_path checks the cache.
    args = edit_args(world_model.model_dir, edits)
    run(1, tmp / "single", args)  # these two evaluate too (the default); the other runs do not
    zero3 = run(2, tmp / "zero3", [*args, *ZERO3])
    args.append("eval.enabled=false")
    run(2, tmp / "fsdp", [*args, "dist.strategy=fsdp"])
    return {
        "tmp": tmp,
        "zero3_log": zero3.stderr,
        "args": args,
        "world": world_model,
        **{name: delta(tmp / name) for name in ("single", "fsdp", "zero3")},
    }


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_zero3_delta_equals_fsdp_and_single_process(setup):
    assert set(setup["zero3"]) == {
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.2.mlp.down_proj.weight",
    }
    for name, tensor in setup["single"].items():
        assert tensor.abs().max() > 1e-3, "training should move the weights"
        torch.testing.assert_close(setup["zero3"][name], tensor, atol=1e-5, rtol=0)
        torch.testing.assert_close(setup["zero3"][name], setup["fsdp"][name], atol=1e-5, rtol=0)
    print(
        f"zero3 vs single {max_diff(setup['zero3'], setup['single']):.2e}, "
        f"vs fsdp {max_diff(setup['zero3'], setup['fsdp']):.2e}"
    )


def _events(run_dir, name: str) -> list[dict]:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == name]


def test_zero3_prefix_cache_equals_the_uncached_path(setup):
    """The partial forwards (cache fill, self-check, layers 1.. in training) run under ZeRO-3's hooks."""
    assert "prefix cache disabled" not in setup["zero3_log"]  # the self-check passed: no fallback
    (event,) = _events(setup["tmp"] / "zero3", "prefix_cache")
    assert event["first_layer"] == 1 and event["num_edits"] == (NUM_EDITS + 1) // 2  # rank 0's edits
    run_dir = setup["tmp"] / "zero3_uncached"
    run(2, run_dir, [*setup["args"], *ZERO3, "train.prefix_cache=false"])
    assert not _events(run_dir, "prefix_cache")
    uncached = delta(run_dir)
    for name, tensor in uncached.items():
        torch.testing.assert_close(setup["zero3"][name], tensor, atol=1e-5, rtol=0)
    print(f"zero3 cached vs uncached {max_diff(setup['zero3'], uncached):.2e}")
    # The tiny model lies under ZeRO-3's persistence threshold (it stays gathered after first use); with
    # none, every module's parameters are gathered by its hooks and released after it, in every pass.
    config = json.loads((REPO / "deepspeed_configs" / "zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (setup["tmp"] / "zero3_unpersisted.json").write_text(json.dumps(config))
    run_dir = setup["tmp"] / "zero3_unpersisted"
    config_arg = f"dist.deepspeed_config={setup['tmp'] / 'zero3_unpersisted.json'}"
    proc = run(2, run_dir, [*setup["args"], "dist.strategy=deepspeed", config_arg])
    assert "prefix cache disabled" not in proc.stderr and _events(run_dir, "prefix_cache")
    for name, tensor in setup["zero3"].items():
        assert torch.equal(delta(run_dir)[name], tensor), name  # gathering changes no arithmetic


def test_zero3_with_the_fused_norm_equals_the_models_own(setup, tmp_path):
    """train.fused_norm (on by default on a GPU) under ZeRO-3 with every module's parameters gathered by its
    hooks (no persistence): the swapped forward still runs inside the norm's own hooks."""
    config = json.loads((REPO / "deepspeed_configs" / "zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero3.json").write_text(json.dumps(config))
    deepspeed = ["dist.strategy=deepspeed", f"dist.deepspeed_config={tmp_path / 'zero3.json'}"]
    proc = run(2, tmp_path / "fused", [*setup["args"], *deepspeed, "train.fused_norm=true"])
    assert "RMSNorm modules run as fused kernels" in proc.stdout + proc.stderr
    fused = delta(tmp_path / "fused")
    for name, tensor in setup["zero3"].items():
        torch.testing.assert_close(fused[name], tensor, atol=1e-5, rtol=0)


def test_zero3_evaluation_reports_the_single_process_numbers(setup):
    single, zero3 = (
        json.loads((setup["tmp"] / name / "metrics.json").read_text()) for name in ("single", "zero3")
    )
    for part in ("unedited", "edited"):
        for key in METRIC_KEYS:  # every family: teacher-forced, EM and WILD
            assert zero3[part][key] == pytest.approx(single[part][key], abs=1e-6), (part, key)
    assert zero3["edited"]["reliability_tf"] > zero3["unedited"]["reliability_tf"]


@pytest.mark.parametrize("config", ["zero2", "zero3_offload"])
def test_zero2_and_offload_deltas_equal_single_process(setup, config):
    run_dir = setup["tmp"] / config
    path = REPO / "deepspeed_configs" / f"{config}.json"
    # Offloading the frozen prefix is a single-process option: ZeRO ranks keep theirs, with a warning.
    args = [*setup["args"], "dist.strategy=deepspeed", f"dist.deepspeed_config={path}"]
    proc = run(2, run_dir, [*args, "train.prefix_cache_offload_prefix=true"])
    assert "prefix_cache_offload_prefix is ignored by DeepSpeedStrategy" in proc.stderr
    assert _events(run_dir, "prefix_cache"), "the prefix cache runs under ZeRO-2 and offload too"
    for name, tensor in setup["single"].items():
        torch.testing.assert_close(delta(run_dir)[name], tensor, atol=1e-5, rtol=0)


def test_zero3_partitions_the_model_across_ranks(setup):
    """zero.Init via the HF DeepSpeed config: rank 0 holds about half of every parameter."""
    match = re.search(r"ZeRO-3: rank 0 holds (\d+) of (\d+) parameter elements", setup["zero3_log"])
    assert match, setup["zero3_log"][-3000:]
    local, full = map(int, match.groups())
    sizes = _base_tensor_sizes(setup)
    assert full == sum(sizes), (full, sum(sizes))
    assert full // 2 <= local <= full // 2 + len(sizes), (local, full)  # each tensor padded to even


def _base_tensor_sizes(setup) -> list[int]:
    from safetensors import safe_open

    with safe_open(str(setup["world"].model_dir / "model.safetensors"), framework="pt") as f:
        return [math.prod(f.get_slice(k).get_shape()) for k in f.keys()]  # noqa: SIM118 (safe_open is not iterable)


def test_optimizer_state_only_for_the_localized_parameters(setup):
    """Measured from the engine's ZeRO optimizer on rank 0 after the first step (log.jsonl "memory")."""

    def memory(name: str) -> dict:
        lines = (setup["tmp"] / name / "log.jsonl").read_text().splitlines()
        return next(e for e in map(json.loads, lines) if e["event"] == "memory")

    trainable = sum(t.numel() for t in setup["zero3"].values())
    zero3 = memory("zero3")["optimizer_bytes"]
    # Adam's two fp32 moments over this rank's half of the localized tensors, plus the step counter(s).
    assert 2 * 4 * trainable // 2 <= zero3 <= 2 * 4 * trainable // 2 + 64, zero3
    assert abs(zero3 - memory("fsdp")["optimizer_bytes"]) <= 64


@pytest.fixture(scope="module")
def interrupted(setup) -> tuple[Path, int]:
    """A 2-rank ZeRO-3 run killed (SIGKILL, launcher and workers at once) at a random step in [7, KILL_BY]:
    (run dir, step). Tests resume copies of it, so the interruption runs once for the module."""
    run_dir = setup["tmp"] / "interrupted"
    kill_at = random.Random(os.getpid()).randint(7, KILL_BY)
    proc = start(2, run_dir, [*setup["args"], *ZERO3])
    wait_for_step(run_dir, kill_at, proc)
    kill9(proc)
    assert not (run_dir / "delta.safetensors").exists()
    return run_dir, kill_at


def test_sigkill_mid_epoch_then_rerun_is_bitwise_identical(setup, interrupted):
    run_dir, kill_at = copy_run(interrupted[0], "killed"), interrupted[1]
    run(2, run_dir, [*setup["args"], *ZERO3])
    events = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert any(e["event"] == "resume" for e in events), f"no resume: {[e['event'] for e in events]}"
    assert len(_events(run_dir, "prefix_cache")) == 2  # the cache is rebuilt on resume, same ownership
    for name, tensor in setup["zero3"].items():
        assert torch.equal(delta(run_dir)[name], tensor), f"{name} differs after kill at step {kill_at}"


def test_resume_on_one_process_after_two_ranks(setup, interrupted):
    """Checkpoints hold full tensors under FSDP's keys: a 2-rank ZeRO-3 run resumes on one process."""
    run_dir = copy_run(interrupted[0], "resize")
    run(1, run_dir, [*setup["args"], *ZERO3])  # no launcher: the strategy makes a group of one
    for name, tensor in setup["single"].items():
        torch.testing.assert_close(delta(run_dir)[name], tensor, atol=1e-5, rtol=0)


def test_signal_saves_exits_with_the_preemption_code_and_resumes(setup):
    run_dir = setup["tmp"] / "preempted"
    args = [a for a in setup["args"] if not a.startswith("output.checkpoint_every")]
    args += ["output.checkpoint_every=100", f"train.epochs={EPOCHS * 4}", *ZERO3]
    proc = start(2, run_dir, args)
    log = run_dir / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.is_file() and '"event": "step"' in log.read_text()):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    ranks = workers(proc)
    assert len(ranks) == 2, ranks
    os.kill(ranks[1], signal.SIGUSR1)  # one rank only: the flag is all-reduced
    _, stderr = proc.communicate(timeout=300)
    assert f"exitcode  : {EXIT_PREEMPTED}" in stderr or f"exitcode: {EXIT_PREEMPTED}" in stderr, stderr[
        -3000:
    ]
    assert sorted((run_dir / "checkpoints").glob("step-*")), "a checkpoint must be written on preemption"
    assert not (run_dir / "delta.safetensors").exists()
    run(2, run_dir, args)
    assert (run_dir / "delta.safetensors").is_file()


def test_a_checkpoint_from_other_data_is_refused(setup, interrupted):
    run_dir = copy_run(interrupted[0], "refused")
    args = [*setup["args"], *ZERO3]
    other = setup["tmp"] / "other.jsonl"
    write_jsonl(setup["world"].world.make_edits(NUM_EDITS, seed=5), other)
    (run_dir / "config.yaml").unlink()  # same directory, other edits: only the checkpoint can object
    args = [a if not a.startswith("edits.path") else f"edits.path={other}" for a in args]
    proc = run(2, run_dir, args, check=False)
    assert proc.returncode != 0 and "another edit set" in proc.stderr, proc.stderr[-3000:]


def test_deepspeed_launcher_runs_the_installed_locft_command(setup):
    """``deepspeed --num_gpus 2 $(which locft) edit ...`` as typed: the launcher adds ``--local_rank=N``."""
    run_dir = setup["tmp"] / "ds_launcher"
    bin_dir = Path(sys.executable).parent
    port = str(free_port())
    launcher = [str(bin_dir / "deepspeed"), "--num_gpus", "2", "--master_port", port]
    proc = subprocess.run(
        [*launcher, str(bin_dir / "locft"), "edit", *setup["args"], *ZERO3, f"output.dir={run_dir}"],
        capture_output=True,
        text=True,
        env={**ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--local_rank=1" in proc.stdout + proc.stderr  # the launcher's own log of the command it ran
    assert "dist_world_size=2" in proc.stdout + proc.stderr
    for name, tensor in setup["zero3"].items():
        assert torch.equal(delta(run_dir)[name], tensor)


@pytest.mark.parametrize("backend", ["deepspeed", "fsdp"])
def test_accelerate_launch_runs_the_same_job(setup, backend):
    """``accelerate launch ... -m locft_dist edit`` and ``accelerate launch ... $(which locft) edit``."""
    run_dir = setup["tmp"] / f"accelerate_{backend}"
    extra = ZERO3 if backend == "deepspeed" else ["dist.strategy=fsdp"]
    launcher = [str(Path(sys.executable).with_name("accelerate")), "launch"]
    entry = ["-m", "locft_dist"] if backend == "deepspeed" else [str(Path(sys.executable).with_name("locft"))]
    proc = subprocess.run(
        [
            *launcher,
            "--config_file",
            f"launch/accelerate_{backend}.yaml",
            "--main_process_port",
            str(free_port()),
            *entry,
            "edit",
            *setup["args"],
            *extra,
            f"output.dir={run_dir}",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = setup["zero3"] if backend == "deepspeed" else setup["fsdp"]
    for name, tensor in expected.items():
        assert torch.equal(delta(run_dir)[name], tensor)


def test_auto_values_are_filled_from_our_config_and_disagreements_refused(tmp_path):
    cfg = load_config(None, ["train.batch_size=10", "train.max_grad_norm=1.0", "dist.strategy=deepspeed"])
    cfg.dist.deepspeed_config = str(REPO / "deepspeed_configs" / "zero3_offload.json")
    ds = resolve_deepspeed_config(cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 1
    assert ds["train_batch_size"] == 12 and ds["gradient_clipping"] == 1.0
    assert ds["bf16"]["enabled"] is False and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "auto" not in json.dumps(ds)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": 32, "zero_optimization": {"stage": 3}}))
    cfg.dist.deepspeed_config = str(bad)
    with pytest.raises(ConfigError, match="train_batch_size"):
        resolve_deepspeed_config(cfg, world_size=4)
    bad.write_text(json.dumps({"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="optimizer"):
        resolve_deepspeed_config(cfg, world_size=4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_zero3_on_gpus_matches_fp32_single_process(setup):
    """bf16 compute with fp32 master weights under ZeRO-3 (NCCL, every visible GPU): near the fp32 delta."""
    run_dir = setup["tmp"] / "bf16_zero3"
    run(torch.cuda.device_count(), run_dir, [*setup["args"], *ZERO3, "model.dtype=bfloat16"])
    for name, tensor in setup["single"].items():
        torch.testing.assert_close(delta(run_dir)[name], tensor, atol=2e-2, rtol=0)
