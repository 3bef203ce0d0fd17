"""FSDP2 under torchrun, 2 ranks over gloo on CPU: equality with one process, exact resume, preemption."""

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from locft_dist.edits import write_jsonl
from locft_dist.eval.metrics import METRIC_KEYS
from locft_dist.run.signals import EXIT_PREEMPTED
from tests.conftest import REPO, free_port

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
NUM_EDITS, BATCH, EPOCHS = 41, 10, 4  # 5 steps an epoch, the last one a single edit (one rank pads)
ADAM_EPS = 1e-3
"""The runs compared across world sizes use Adam with this epsilon, so that atol=1e-5 holds by a margin.

Data parallelism sums each step's per-edit gradients in another float32 order on each world size (here up
to ~7e-8 apart on gradients of ~0.1; ~1e-9 where the terms cancel). Adam's first update of a weight is
lr * g / (|g| + eps), whose slope in g is lr / eps at g = 0: with torch's eps = 1e-8 and lr = 1e-2 a weight
whose first gradient cancels to within rounding of zero amplifies a 1e-9 difference 1e6-fold, to ~1e-5 in
the delta (1 weight in 16K did here, at random). With eps = 1e-3 the slope is at most 10, which bounds the
difference over the 20 steps at ~2e-7 (measured: 2.4e-7 between one process and ZeRO-3 on two ranks)."""


def edit_args(
    model_dir, edits, batch_size: int = BATCH, epochs: int = EPOCHS, checkpoint_every: int = 1
) -> list[str]:
    """The small two-layer editing job every distributed test runs (by default, checkpoints every step)."""
    return [
        f"model.path={model_dir}",
        f"edits.path={edits}",
        "locate.layers=[1, 2]",
        "train.lr=1e-2",
        f"train.batch_size={batch_size}",
        f"train.epochs={epochs}",
        "train.progress=false",
        "train.early_stop_loss=null",
        f"train.adam_eps={ADAM_EPS}",
        f"output.checkpoint_every={checkpoint_every}",
    ]


NO_PICKLE = str(REPO / "tests" / "dist_workers" / "no_pickle_locft.py")
"""``locft`` with pickle.load/loads patched to raise."""


def command(nproc: int, run_dir, args, script: str | None = None) -> list[str]:
    """``python -m locft_dist edit`` or ``torchrun ... -m locft_dist edit`` as typed (or ``script``)."""
    entry = [script] if script else ["-m", "locft_dist"]
    launcher = [sys.executable, *entry]
    if nproc > 1:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            *entry,
        ]
    return [*launcher, "edit", *args, f"output.dir={run_dir}"]


def run(nproc: int, run_dir, args, check=True, script: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        command(nproc, run_dir, args, script), capture_output=True, text=True, env=ENV, cwd=REPO, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def start(nproc: int, run_dir, args, script: str | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        command(nproc, run_dir, args, script),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=REPO,
        start_new_session=True,
    )


def wait_for_step(run_dir, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    log = run_dir / "log.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if log.is_file():
            steps = [
                json.loads(line).get("step", 0)
                for line in log.read_text().splitlines()
                if '"event": "checkpoint"' in line
            ]
            if steps and max(steps) >= step:
                return
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint at step {step} within {timeout}s")


def workers(proc: subprocess.Popen) -> list[int]:
    """torchrun's worker processes (it starts each in a session of its own, so killpg misses them)."""
    out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


def kill9(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every worker at once, like a node failure."""
    for pid in [*workers(proc), proc.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def delta(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "delta.safetensors"))


@pytest.fixture(scope="module")
def setup(world_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    edits = tmp / "edits.jsonl"
    write_jsonl(world_model.world.make_edits(NUM_EDITS, seed=2), edits)
    args = edit_args(world_model.model_dir, edits)
    single, double = tmp / "single", tmp / "double"
    run(1, single, args)
    run(2, double, args)
    metrics = {
        name: json.loads((path / "metrics.json").read_text())
        for name, path in (("single", single), ("double", double))
    }
    return {
        "tmp": tmp,
        "args": args,
        "single": delta(single),
        "double": delta(double),
        "world": world_model,
        "metrics": metrics,
    }


def test_two_ranks_equal_one_process(setup):
    assert set(setup["single"]) == {
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.2.mlp.down_proj.weight",
    }
    for name, tensor in setup["single"].items():
        assert tensor.abs().max() > 1e-3, "training should move the weights"
        torch.testing.assert_close(setup["double"][name], tensor, atol=1e-5, rtol=0)


def test_two_ranks_with_the_fused_norm_equal_one_process(setup):
    """train.fused_norm (on by default on a GPU) through FSDP2's sharded passes, at CPU size."""
    run_dir = setup["tmp"] / "double_fused"
    proc = run(2, run_dir, [*setup["args"], "train.fused_norm=true"])
    assert "RMSNorm modules run as fused kernels" in proc.stdout + proc.stderr
    fused = delta(run_dir)
    for name, tensor in setup["single"].items():
        torch.testing.assert_close(fused[name], tensor, atol=1e-5, rtol=0)


KILL_BY = 5 * (EPOCHS - 2) + 2
"""Bitwise resume is checked where more than an epoch remains, so the resumed run rebuilds the prefix cache
(with at most one epoch left it trains without: tests/test_prefix_cache_dist.py); a kill lands a step or
two after the checkpoint it waited for, hence the margin."""


@pytest.fixture(scope="module")
def interrupted(setup) -> dict[int, tuple[Path, int]]:
    """A run killed (SIGKILL, launcher and workers at once) mid-way, per world size: ``{nproc: (run dir,
    step it was killed after)}``. Tests resume copies of these, so each interruption runs once per module.
    Both run with pickle patched to raise, and 2 ranks are killed at a random step in [7, KILL_BY]."""
    killed = {}
    for nproc, kill_at in ((2, random.Random(os.getpid()).randint(7, KILL_BY)), (1, 7)):
        run_dir = setup["tmp"] / f"interrupted_{nproc}"
        proc = start(nproc, run_dir, setup["args"], script=NO_PICKLE)
        wait_for_step(run_dir, kill_at, proc)
        kill9(proc)
        assert not (run_dir / "delta.safetensors").exists()
        killed[nproc] = (run_dir, kill_at)
    return killed


def copy_run(source: Path, name: str) -> Path:
    """A fresh copy of run directory ``source`` beside it (a run directory resumes wherever it lies)."""
    target = source.parent / name
    shutil.copytree(source, target)
    return target


def test_sigkill_mid_epoch_then_rerun_is_bitwise_identical(setup, interrupted):
    run_dir = copy_run(interrupted[2][0], "killed")
    kill_at = interrupted[2][1]  # mid-epoch or at a boundary
    run(2, run_dir, setup["args"])
    events = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert any(e["event"] == "resume" for e in events), f"no resume: {[e['event'] for e in events]}"
    for name, tensor in setup["double"].items():
        assert torch.equal(delta(run_dir)[name], tensor), f"{name} differs after kill at step {kill_at}"


@pytest.mark.parametrize(("first", "second"), [(2, 1), (1, 2)])
def test_resume_on_another_world_size_without_unpickling(setup, interrupted, first, second):
    """Both attempts run with pickle.load/loads patched to raise: checkpoints are safetensors + JSON."""
    run_dir = copy_run(interrupted[first][0], f"resize_{first}_{second}")
    resumed = run(second, run_dir, setup["args"], script=NO_PICKLE)
    assert "UNPICKLED" not in resumed.stderr
    events = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    (resume,) = [e for e in events if e["event"] == "resume"]
    assert resume["saved_world_size"] == first and resume["world_size"] == second and resume["step"] >= 7
    for name, tensor in setup["single"].items():
        torch.testing.assert_close(delta(run_dir)[name], tensor, atol=1e-5, rtol=0)


def test_the_patch_catches_an_unpickling_checkpoint_reader(setup, tmp_path):
    """The patched command does fail where something unpickles (here: DCP's default reader)."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import runpy, sys, torch, torch.distributed.checkpoint as dcp\n"
        f"dcp.save({{'x': torch.ones(2)}}, checkpoint_id={str(tmp_path / 'ckpt')!r}, no_dist=True)\n"
        f"sys.argv = [{NO_PICKLE!r}, '--help']\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit:\n    pass\n"
        f"dcp.load({{'x': torch.zeros(2)}}, checkpoint_id={str(tmp_path / 'ckpt')!r}, no_dist=True)\n"
    )
    proc = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, env=ENV, cwd=REPO)
    assert proc.returncode != 0 and "UNPICKLED" in proc.stderr, proc.stderr[-2000:]


def test_any_checkpoint_of_a_two_rank_run_exports_as_its_delta(setup):
    """The last checkpoint of the 2-rank run (two safetensors files) assembled on one process = its delta."""
    from locft_dist.run.export import export_delta

    run_dir = setup["tmp"] / "double"
    final = 5 * EPOCHS
    assert len(list((run_dir / "checkpoints" / f"step-{final}").glob("*.safetensors"))) == 2
    out = export_delta(run_dir, step=final)
    assert out == run_dir / f"delta-step-{final}.safetensors"
    exported = load_file(str(out))
    assert exported.keys() == setup["double"].keys()
    for name, tensor in setup["double"].items():
        assert torch.equal(exported[name], tensor), name


def test_torchrun_starts_the_installed_locft_command(setup):
    """``torchrun --nproc_per_node 2 $(which locft) edit ...`` as typed."""
    run_dir = setup["tmp"] / "console_script"
    locft = Path(sys.executable).with_name("locft")
    assert locft.is_file(), f"{locft}: the package is not installed in this environment"
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(locft),
    ]
    proc = subprocess.run(
        [*launcher, "edit", *setup["args"], f"output.dir={run_dir}"],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, tensor in setup["double"].items():
        assert torch.equal(delta(run_dir)[name], tensor)


def test_signal_saves_exits_with_the_preemption_code_and_resumes(setup):
    run_dir = setup["tmp"] / "preempted"
    args = [a for a in setup["args"] if not a.startswith("output.checkpoint_every")] + [
        "output.checkpoint_every=100",
        f"train.epochs={EPOCHS * 4}",
    ]
    proc = subprocess.Popen(
        command(2, run_dir, args),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=REPO,
        start_new_session=True,
    )
    log = run_dir / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.is_file() and '"event": "step"' in log.read_text()):
        time.sleep(0.05)
    ranks = workers(proc)
    assert len(ranks) == 2, ranks
    os.kill(ranks[1], signal.SIGUSR1)  # one rank only: the flag is all-reduced
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert f"exitcode  : {EXIT_PREEMPTED}" in stderr or f"exitcode: {EXIT_PREEMPTED}" in stderr, stderr[
        -3000:
    ]
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*"))
    assert checkpoints, "a checkpoint must be written on preemption"
    assert not (run_dir / "delta.safetensors").exists()
    run(2, run_dir, args)
    assert (run_dir / "delta.safetensors").is_file()


def test_single_process_preemption_exit_code(setup):
    run_dir = setup["tmp"] / "preempted_single"
    args = [*setup["args"], f"train.epochs={EPOCHS * 20}"]
    proc = start(1, run_dir, args)
    wait_for_step(run_dir, 2, proc)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == EXIT_PREEMPTED
    assert "rerun the same command to resume" in proc.stderr.read()


def test_corrupted_latest_checkpoint_falls_back_with_a_warning(setup, interrupted):
    run_dir = copy_run(interrupted[2][0], "corrupt")
    newest = max((run_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    victim = max((p for p in newest.iterdir() if p.suffix == ".safetensors"), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    proc = run(2, run_dir, setup["args"])
    assert "skipping checkpoint" in proc.stderr
    for name, tensor in setup["double"].items():
        assert torch.equal(delta(run_dir)[name], tensor)


def test_a_checkpoint_from_other_data_is_refused(setup, interrupted):
    run_dir = copy_run(interrupted[1][0], "refused")
    other = setup["tmp"] / "other.jsonl"
    write_jsonl(setup["world"].world.make_edits(NUM_EDITS, seed=5), other)
    (run_dir / "config.yaml").unlink()  # same directory, other edits: only the checkpoint can object
    args = [a if not a.startswith("edits.path") else f"edits.path={other}" for a in setup["args"]]
    proc = run(1, run_dir, args, check=False)
    assert proc.returncode == 2 and "another edit set" in proc.stderr


def test_distributed_evaluation_reports_the_single_process_numbers(setup):
    single, double = setup["metrics"]["single"], setup["metrics"]["double"]
    for part in ("unedited", "edited"):
        for key in METRIC_KEYS:  # every family: teacher-forced, EM and WILD
            assert double[part][key] == pytest.approx(single[part][key], abs=1e-6), (part, key)
    assert double["edited"]["reliability_tf"] > double["unedited"]["reliability_tf"]


def test_launch_script_runs_the_same_job(setup):
    run_dir = setup["tmp"] / "launcher"
    proc = subprocess.run(
        ["bash", "launch/torchrun.sh", *setup["args"], f"output.dir={run_dir}"],
        capture_output=True,
        text=True,
        # the script runs `python` from PATH: this interpreter's, as in an activated environment
        env={**ENV, "NPROC": "2", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, tensor in setup["double"].items():
        assert torch.equal(delta(run_dir)[name], tensor)


def test_two_nodes_with_c10d_rendezvous(setup):
    """Two torchrun agents (one process each), as on two nodes, meeting through a c10d rendezvous."""
    port = free_port()
    run_dir = setup["tmp"] / "two_nodes"
    agents = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc_per_node=1",
                "--rdzv_backend=c10d",
                f"--rdzv_endpoint=127.0.0.1:{port}",
                "--rdzv_id=locft-test",
                "-m",
                "locft_dist.cli",
                "edit",
                *setup["args"],
                f"output.dir={run_dir}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
            cwd=REPO,
        )
        for _ in range(2)
    ]
    for agent in agents:
        _, stderr = agent.communicate(timeout=600)
        assert agent.returncode == 0, stderr[-3000:]
    for name, tensor in setup["double"].items():
        torch.testing.assert_close(delta(run_dir)[name], tensor, atol=1e-6, rtol=0)
