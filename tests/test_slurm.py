"""The sbatch scripts on a real single-node SLURM cluster on localhost: 2 CPU tasks, preempted, requeued.

Starts munged + slurmctld + slurmd (tests/slurm_cluster.py; installs Debian's packages when missing and
skips with the reason where that is impossible), then submits ``slurm/edit_torchrun.sbatch`` with 2 tasks
(two torchrun agents meeting in a c10d rendezvous, one gloo rank each):
an uninterrupted run (through ``locft slurm submit``), a run preempted by
``scancel --signal=USR1 --batch`` and one preempted by a job in a higher-priority partition. Each preempted
job must save, requeue itself, resume from its checkpoint and end with the uninterrupted run's delta.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from locft_dist.edits import write_jsonl
from tests.conftest import REPO
from tests.slurm_cluster import SlurmUnavailable, start_cluster
from tests.test_distributed import edit_args

SCRIPT = REPO / "slurm" / "edit_torchrun.sbatch"
DEEPSPEED_SCRIPT = REPO / "slurm" / "edit_deepspeed.sbatch"
NUM_EDITS, BATCH, EPOCHS = 41, 10, 40  # 200 steps: long enough to be interrupted after the first one

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(sys.platform != "linux", reason="the local SLURM cluster needs Linux"),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = Path(f"/tmp/locft-slurm-test-{os.getpid()}")  # short absolute path: munge's socket lives here
    try:
        cluster = start_cluster(root)
    except SlurmUnavailable as why:
        pytest.skip(f"no local SLURM cluster: {why}")
    yield cluster
    cluster.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def job_setup(world_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm")
    edits = tmp / "edits.jsonl"
    write_jsonl(world_model.world.make_edits(NUM_EDITS, seed=2), edits)
    args = edit_args(world_model.model_dir, edits, batch_size=BATCH, epochs=EPOCHS, checkpoint_every=100)
    env = {
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "LOCFT_PYTHON": sys.executable,
        "LOCFT_NPROC": "1",
    }
    return {"tmp": tmp, "args": args, "env": env}


def submit(
    cluster, setup, name: str, *sbatch_args: str, extra_env: dict | None = None, script: Path = SCRIPT
) -> tuple[str, Path]:
    tmp = setup["tmp"]
    log = tmp / f"{name}.out"
    env = {**cluster.env, **setup["env"], **(extra_env or {})}
    cmd = [
        "sbatch",
        "--parsable",
        "--ntasks-per-node=2",
        "--cpus-per-task=1",
        "--time=00:15:00",
        f"--output={log}",
        *sbatch_args,
        str(script),
        *setup["args"],
        f"output.dir={tmp / name}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0], log


def wait_for(predicate, timeout: float, what: str, cluster=None, job_id=None, log: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    detail = cluster.job(job_id) if cluster and job_id else {}
    text = log.read_text()[-4000:] if log and log.is_file() else ""
    raise AssertionError(f"timed out waiting for {what}; job {detail}\n{text}")


def wait_done(cluster, job_id: str, log: Path, timeout: float = 400) -> dict[str, str]:
    final = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    wait_for(
        lambda: cluster.job(job_id)["JobState"] in final,
        timeout,
        f"job {job_id} to end",
        cluster,
        job_id,
        log,
    )
    return cluster.job(job_id)


def wait_for_training(run_dir: Path, cluster, job_id: str, log: Path) -> None:
    events = run_dir / "log.jsonl"
    wait_for(
        lambda: events.is_file() and '"event": "step"' in events.read_text(),
        300,
        "the first training step",
        cluster,
        job_id,
        log,
    )


def delta(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "delta.safetensors"))


def check_resumed_with_the_same_delta(setup, name: str, job: dict, log: Path, atol: float = 0.0) -> None:
    text = log.read_text()
    run_dir = setup["tmp"] / name
    assert job["JobState"] == "COMPLETED", f"{job}\n{text[-4000:]}"
    assert int(job["Restarts"]) >= 1, f"the job did not requeue: {job}\n{text[-4000:]}"
    assert "restart 0] start" in text and "restart 1] start" in text, text[-4000:]  # --open-mode=append
    assert "preemption signal received" in text, text[-4000:]
    events = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert any(e["event"] == "resume" for e in events), [e["event"] for e in events]
    reference = delta(setup["tmp"] / "reference")
    got = delta(run_dir)
    assert set(got) == set(reference)
    for key, tensor in reference.items():
        if atol:
            torch.testing.assert_close(got[key], tensor, atol=atol, rtol=0)
        else:
            assert torch.equal(got[key], tensor), f"{key} differs after preemption and resume"


@pytest.fixture(scope="module")
def reference(cluster, job_setup):
    """An uninterrupted 2-task run, submitted through ``locft slurm submit``."""
    tmp = job_setup["tmp"]
    env = {**cluster.env, **job_setup["env"]}
    proc = subprocess.run(
        [
            sys.executable, "-m", "locft_dist.cli", "slurm", "submit",
            "--ntasks-per-node", "2", "--nproc", "1", "--cpus-per-task", "1", "--time", "00:15:00",
            "--log-dir", str(tmp / "logs"), "--",
            *job_setup["args"], f"output.dir={tmp / 'reference'}",
        ],
        capture_output=True, text=True, env=env, cwd=tmp, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(None, 1) for line in proc.stdout.splitlines() if line.strip())
    job_id, log = lines["job"], Path(lines["log:"])
    assert lines["delta:"] == str(tmp / "reference" / "delta.safetensors")
    job = wait_done(cluster, job_id, log)
    text = log.read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "0", f"{job}\n{text[-4000:]}"
    assert "] done" in text
    return delta(tmp / "reference")


def test_uninterrupted_job_finishes_and_does_not_requeue(reference):
    assert reference and all(t.abs().max() > 1e-3 for t in reference.values())


def test_srun_runs_locft_edit_as_typed(cluster, job_setup, reference):
    """``srun --ntasks 2 locft edit ...`` in an allocation, no torchrun: ranks from SLURM's variables."""
    tmp = job_setup["tmp"]
    log, run_dir = tmp / "srun.out", tmp / "srun"
    locft = Path(sys.executable).with_name("locft")
    command = shlex.join(
        ["srun", "--ntasks=2", str(locft), "edit", *job_setup["args"], f"output.dir={run_dir}"]
    )
    proc = subprocess.run(
        ["sbatch", "--parsable", "--ntasks=2", "--cpus-per-task=1", "--time=00:15:00", f"--output={log}",
         "--wrap", command],
        capture_output=True, text=True, env={**cluster.env, **job_setup["env"]}, cwd=tmp, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    job = wait_done(cluster, proc.stdout.strip().split(";")[0], log)
    assert job["JobState"] == "COMPLETED", f"{job}\n{log.read_text()[-4000:]}"
    setup = json.loads((run_dir / "log.jsonl").read_text().splitlines()[0])
    assert setup["event"] == "setup" and setup["world_size"] == 2
    for key, tensor in reference.items():
        assert torch.equal(delta(run_dir)[key], tensor), key


def test_usr1_to_the_batch_shell_saves_requeues_and_resumes(cluster, job_setup, reference):
    job_id, log = submit(cluster, job_setup, "usr1")
    wait_for_training(job_setup["tmp"] / "usr1", cluster, job_id, log)
    cluster.cmd("scancel", "--signal=USR1", "--batch", job_id)
    job = wait_done(cluster, job_id, log)
    check_resumed_with_the_same_delta(job_setup, "usr1", job, log)
    assert "preempted: checkpoint saved; requeueing" in log.read_text()


def test_partition_preemption_saves_requeues_and_resumes(cluster, job_setup, reference):
    job_id, log = submit(cluster, job_setup, "preempt")
    wait_for_training(job_setup["tmp"] / "preempt", cluster, job_id, log)
    cpus = cluster.cmd("sinfo", "-h", "-p", "urgent", "-o", "%c").strip()
    urgent = cluster.cmd(
        "sbatch", "--parsable", "-p", "urgent", "-n", cpus, f"--output={job_setup['tmp'] / 'urgent.out'}",
        "--wrap", "sleep 1",
    ).strip()  # fmt: skip
    job = wait_done(cluster, job_id, log)
    assert cluster.job(urgent)["JobState"] == "COMPLETED"
    check_resumed_with_the_same_delta(job_setup, "preempt", job, log)


def test_deepspeed_script_usr1_saves_requeues_and_resumes(cluster, job_setup, reference):
    """slurm/edit_deepspeed.sbatch: ZeRO-3 ranks; its delta matches FSDP's within 1e-5 (docs/deepspeed.md)."""
    pytest.importorskip("deepspeed")
    job_id, log = submit(cluster, job_setup, "deepspeed", script=DEEPSPEED_SCRIPT)
    wait_for_training(job_setup["tmp"] / "deepspeed", cluster, job_id, log)
    cluster.cmd("scancel", "--signal=USR1", "--batch", job_id)
    job = wait_done(cluster, job_id, log)
    assert "dist_world_size=2" in log.read_text()
    check_resumed_with_the_same_delta(job_setup, "deepspeed", job, log, atol=1e-5)


def test_time_limit_signal_saves_requeues_and_resumes(cluster, job_setup):
    """``--time=00:02:00 --signal=B:USR1@50``: SLURM itself signals the batch shell before the limit.

    slurmctld may send the signal up to 60 s early (sbatch(1)), and one sent before the batch shell runs
    is lost: due 70 s in, it comes 10 s in at the earliest, after start-up. The run is far longer than the
    limit; once the requeued attempt has resumed from the checkpoint the job is cancelled, which saves and
    does not requeue (finishing a resumed run, with the same delta, is what the USR1 and preemption tests
    check).
    """
    long_run = {**job_setup, "args": [*job_setup["args"], "train.epochs=100000"]}
    job_id, log = submit(cluster, long_run, "timelimit", "--time=00:02:00", "--signal=B:USR1@50")
    events_file = job_setup["tmp"] / "timelimit" / "log.jsonl"

    def resumed() -> bool:
        return events_file.is_file() and '"event": "resume"' in events_file.read_text()

    wait_for(resumed, 300, "the requeued attempt to resume", cluster, job_id, log)
    restarts = int(cluster.job(job_id)["Restarts"])
    cluster.cmd("scancel", job_id)  # a user's cancel: saved, not requeued
    job = wait_done(cluster, job_id, log)
    text = log.read_text()
    script_lines = "\n".join(line for line in text.splitlines() if line.startswith("[locft-slurm"))
    assert restarts >= 1, script_lines
    assert "got USR1" in text and "preemption signal received" in text, script_lines
    assert "preempted: checkpoint saved; requeueing" in text and "restart 1] start" in text, script_lines
    assert job["JobState"] == "CANCELLED" and int(job["Restarts"]) == restarts, f"{job}\n{script_lines}"
    assert f"restart {restarts}] cancelled (scancel): checkpoint saved; not requeueing" in text, script_lines


def test_a_failing_job_stops_after_the_allowed_restarts(cluster, job_setup):
    """A crash (here: the python the script runs does not start) is retried LOCFT_MAX_FAILURES times."""
    job_id, log = submit(
        cluster,
        job_setup,
        "failing",
        extra_env={
            "LOCFT_MAX_FAILURES": "1",
            "LOCFT_STATE_DIR": str(job_setup["tmp"]),
            "LOCFT_PYTHON": "false",
        },
    )
    job = wait_done(cluster, job_id, log)
    text = log.read_text()
    assert job["JobState"] == "FAILED", f"{job}\n{text[-3000:]}"
    assert job["Restarts"] == "1", job
    assert "the run failed 2 times (LOCFT_MAX_FAILURES=1); not requeueing" in text, text[-3000:]


def test_bad_input_fails_at_once_without_requeueing(cluster, job_setup):
    """locft's refusal (exit 2, a bad model path) is not retried: no requeue, and the reason is shown."""
    job_id, log = submit(
        cluster,
        {**job_setup, "args": [*job_setup["args"], "model.path=/nonexistent/model"]},
        "refused",
        extra_env={"LOCFT_STATE_DIR": str(job_setup["tmp"])},
    )
    job = wait_done(cluster, job_id, log)
    text = log.read_text()
    assert job["JobState"] == "FAILED" and job["Restarts"] == "0", f"{job}\n{text[-3000:]}"
    assert "locft refused the run; not requeueing" in text and "/nonexistent/model" in text, text[-3000:]
    assert not list(job_setup["tmp"].glob(f".locft-slurm-{job_id}.*")), "state files left behind"


def test_submit_dry_run_prints_the_sbatch_command(tmp_path):
    """No cluster needed: the sbatch line `locft slurm submit` would run for 8 nodes x 8 GPUs."""
    proc = subprocess.run(
        [
            sys.executable, "-m", "locft_dist.cli", "slurm", "submit", "--dry-run",
            "--nodes", "8", "--gpus-per-node", "8", "--time", "12:00:00", "--log-dir", str(tmp_path),
            "--", "train.lr=1e-4", f"output.dir={tmp_path}/run",
        ],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    for part in ("--nodes=8", "--gpus-per-node=8", "--time=12:00:00", "LOCFT_NPROC=8", "--signal=B:USR1@300"):
        assert part in line, line
    assert line.endswith(f"{SCRIPT.resolve()} train.lr=1e-4 output.dir={tmp_path}/run"), line
