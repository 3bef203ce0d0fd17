"""Runs as people rerun them, through real processes: Ctrl-C, a kill during the final evaluation, a rerun
from another directory with other path spellings and budgets, ``output.overwrite=true`` requeued, an
exported mid-run delta applied with plain transformers, and the report of a resumed run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from locft_dist.edits import write_jsonl
from locft_dist.report import write_report
from locft_dist.run.signals import EXIT_INTERRUPTED, EXIT_PREEMPTED
from tests.test_distributed import ENV, EPOCHS, NUM_EDITS, delta, edit_args, run, start

STEPS_PER_EPOCH = 5


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def wait_for_event(run_dir: Path, name: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    log = run_dir / "log.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if log.is_file() and f'"event": "{name}"' in log.read_text():
            return
        time.sleep(0.02)
    raise AssertionError(f"no {name} event within {timeout}s")


def stop_early(run_dir: Path, proc: subprocess.Popen, how: int = signal.SIGTERM) -> str:
    """Signal the run as training starts (its prefix cache is built), so it stops within a step or two;
    returns its stderr after checking the clean-stop exit code."""
    wait_for_event(run_dir, "prefix_cache", proc)
    os.kill(proc.pid, how)
    code = proc.wait(timeout=120)
    stderr = proc.stderr.read()
    assert code == EXIT_PREEMPTED, stderr[-3000:]
    return stderr


@pytest.fixture(scope="module")
def setup(world_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    edits = tmp / "data" / "edits.jsonl"
    write_jsonl(world_model.world.make_edits(NUM_EDITS, seed=2), edits)
    args = [*edit_args(world_model.model_dir, edits), "output.keep_last=100"]
    quiet = [*args, "eval.enabled=false"]
    run(1, tmp / "reference", args)  # uninterrupted, evaluated, every step checkpointed
    return {"tmp": tmp, "args": args, "quiet": quiet, "edits": edits, "model": world_model.model_dir}


def test_ctrl_c_saves_at_the_next_step_and_the_rerun_resumes(setup):
    run_dir = setup["tmp"] / "ctrl_c"
    args = [*setup["quiet"], "output.checkpoint_every=0"]  # otherwise only epoch ends are saved
    stderr = stop_early(run_dir, start(1, run_dir, args), signal.SIGINT)
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    assert "SIGINT: saving a checkpoint after this step, then stopping" in stderr, stderr[-3000:]
    assert "rerun the same command to resume" in stderr
    (stopped,) = [e for e in events(run_dir) if e["event"] == "stopped"]
    assert stopped["step"] % STEPS_PER_EPOCH, "saved mid-epoch, at the step the signal arrived in"
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [f"step-{stopped['step']}"]

    run(1, run_dir, args)
    (resume,) = [e for e in events(run_dir) if e["event"] == "resume"]
    assert resume["step"] == stopped["step"]
    for name, tensor in delta(setup["tmp"] / "reference").items():
        assert torch.equal(delta(run_dir)[name], tensor), name

    # the report covers both attempts: edits/s x seconds = every edit pass of the run, the resume is marked
    write_report(run_dir)
    report = (run_dir / "report" / "report.md").read_text()
    assert f"| resumes | 1 (from step {stopped['step']}" in report, report
    (trained,) = [e for e in events(run_dir) if e["event"] == "trained"]
    passes = trained["edits_per_second"] * trained["seconds"]
    assert passes == pytest.approx(EPOCHS * NUM_EDITS, rel=0.02), trained
    assert trained["num_steps"] == EPOCHS * STEPS_PER_EPOCH


def test_a_second_ctrl_c_stops_at_once(setup, world_model):
    """Steps of seconds (70 edits and 4 pseudo-paraphrases each, one example per forward/backward, no prefix
    cache): the second Ctrl-C lands long before the step boundary where the first one would save."""
    many = setup["tmp"] / "many.jsonl"
    write_jsonl(world_model.world.make_edits(70, seed=3), many)
    run_dir = setup["tmp"] / "ctrl_c_twice"
    args = [a for a in setup["quiet"] if not a.startswith(("edits.path", "train.batch_size"))]
    args += [
        f"edits.path={many}",
        "augment.paraphrases=4",
        "train.batch_size=350",
        "train.micro_batch_size=1",
    ]
    args += ["train.prefix_cache=false", "output.checkpoint_every=0", "train.epochs=50"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "locft_dist", "edit", *args, f"output.dir={run_dir}"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=ENV,
        start_new_session=True,
    )
    wait_for_event(run_dir, "step", proc)
    os.kill(proc.pid, signal.SIGINT)
    line = ""
    while "saving a checkpoint after this step" not in line:
        line = proc.stderr.readline()
        assert line, "the process ended before acknowledging Ctrl-C"
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) == EXIT_INTERRUPTED
    stderr = proc.stderr.read()
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "second Ctrl-C: stopping at once" in stderr and "interrupted; rerun the same command" in stderr
    assert not list((run_dir / "checkpoints").glob("step-*")), "stopping at once saves nothing"


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_killed_during_the_final_evaluation_the_rerun_evaluates(setup, how):
    run_dir = setup["tmp"] / f"eval_{how.name}"
    slow_eval = [*setup["args"], "eval.batch_size=2"]  # a few seconds of evaluation to be stopped in
    proc = start(1, run_dir, slow_eval)
    wait_for_event(run_dir, "delta", proc)
    os.kill(proc.pid, how)
    code = proc.wait(timeout=120)
    assert not (run_dir / "metrics.json").exists()
    if how == signal.SIGTERM:
        stderr = proc.stderr.read()
        assert code == EXIT_PREEMPTED, stderr[-3000:]
        assert "stopped by SIGTERM while evaluating the edited model" in stderr, stderr[-3000:]
        assert "Traceback" not in stderr
    first = len(events(run_dir))

    rerun = run(1, run_dir, setup["args"])  # eval.batch_size back to its default: allowed, logged
    assert "eval.batch_size 2 -> 64" in rerun.stderr
    later = events(run_dir)[first:]
    assert not [e for e in later if e["event"] == "step"], "the rerun must not train again"
    assert [e["step"] for e in later if e["event"] == "resume"] == [EPOCHS * STEPS_PER_EPOCH]
    assert [e["event"] for e in later][-2:] == ["evaluated", "done"]
    got = json.loads((run_dir / "metrics.json").read_text())
    expected = json.loads((setup["tmp"] / "reference" / "metrics.json").read_text())
    for part in ("edited", "unedited"):
        for key, value in expected[part].items():
            assert got[part][key] == pytest.approx(value, abs=1e-6), (part, key)
    assert got["train"]["num_steps"] == expected["train"]["num_steps"]
    # and the run is finished now: a third run does nothing
    again = run(1, run_dir, setup["args"])
    assert "already holds this run, finished" in again.stdout and len(events(run_dir)) == len(later) + first


def test_resume_from_another_directory_with_other_spellings_and_budgets(setup):
    """Relative paths spelled differently from another working directory, a changed micro-batch budget
    and cache setting: the same run, resumed; the delta ends within 1e-5 of the uninterrupted one."""
    home = setup["tmp"]
    model = Path(setup["model"])
    first = [a for a in setup["quiet"] if not a.startswith(("model.path", "edits.path"))]
    first += [f"model.path={os.path.relpath(model, home)}", "edits.path=./data/edits.jsonl"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "locft_dist", "edit", *first, "output.dir=runs/moved"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=home,
        start_new_session=True,
    )
    stop_early(home / "runs" / "moved", proc)

    data = home / "data"
    second = [a for a in first if not a.startswith(("model.path", "edits.path"))]
    second += [f"model.path={os.path.relpath(model, data)}/", "edits.path=edits.jsonl"]
    second += ["train.micro_batch_tokens=64", "train.prefix_cache=false", "output.keep_last=3"]
    proc = subprocess.run(
        [sys.executable, "-m", "locft_dist", "edit", *second, "output.dir=../runs/./moved/"],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=data,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "train.micro_batch_tokens 4096 -> 64" in proc.stderr
        and "train.prefix_cache True -> False" in proc.stderr
    )
    run_dir = home / "runs" / "moved"
    (resume,) = [e for e in events(run_dir) if e["event"] == "resume"]
    assert 0 < resume["step"] < EPOCHS * STEPS_PER_EPOCH
    for name, tensor in delta(home / "reference").items():
        torch.testing.assert_close(delta(run_dir)[name], tensor, atol=1e-5, rtol=0)


def test_a_rerun_that_changes_results_is_refused_naming_each_key(setup):
    run_dir = setup["tmp"] / "reference"
    other_edits = setup["tmp"] / "other.jsonl"
    other_edits.write_text(setup["edits"].read_text().splitlines()[0] + "\n")
    args = [a for a in setup["args"] if not a.startswith(("train.lr", "edits.path"))]
    proc = run(1, run_dir, [*args, "train.lr=0.02", f"edits.path={other_edits}"], check=False)
    assert proc.returncode == 2
    assert "train.lr: 0.01 in the run, 0.02 now" in proc.stderr, proc.stderr[-3000:]
    assert f"edits content ({other_edits})" in proc.stderr
    assert "its checkpoints are kept" in proc.stderr and "locft edit --config" in proc.stderr
    assert (run_dir / "checkpoints" / f"step-{EPOCHS * STEPS_PER_EPOCH}").is_dir()


def test_a_requeued_overwrite_command_resumes_instead_of_starting_over(setup):
    run_dir = setup["tmp"] / "overwrite"
    args = [*setup["quiet"], "output.overwrite=true"]
    stop_early(run_dir, start(1, run_dir, args))
    run(1, run_dir, args)  # the same command again, as a requeued SLURM job runs it
    (resume,) = [e for e in events(run_dir) if e["event"] == "resume"]
    assert 0 < resume["step"] < EPOCHS * STEPS_PER_EPOCH
    for name, tensor in delta(setup["tmp"] / "reference").items():
        assert torch.equal(delta(run_dir)[name], tensor), name


def test_an_exported_mid_run_delta_reproduces_that_steps_weights(setup):
    """Step 10 of the 4-epoch run, exported and added with plain transformers + safetensors, equals the
    weights of a run that stops after 2 epochs (constant learning rate: the same first 10 steps)."""
    reference = setup["tmp"] / "reference"
    proc = subprocess.run(
        [sys.executable, "-m", "locft_dist", "export-delta", str(reference), "--step", "10"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = reference / "delta-step-10.safetensors"
    assert f"wrote {exported}" in proc.stdout
    two_epochs = setup["tmp"] / "two_epochs"
    run(1, two_epochs, [*setup["quiet"], "train.epochs=2"])

    def edited_weights(delta_file: Path) -> dict[str, torch.Tensor]:
        model = AutoModelForCausalLM.from_pretrained(setup["model"], use_safetensors=True)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in load_file(str(delta_file)).items():
                params[name].add_(value)
        return {name: params[name].detach().clone() for name in load_file(str(delta_file))}

    got, expected = edited_weights(exported), edited_weights(two_epochs / "delta.safetensors")
    assert got.keys() == expected.keys() and got
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    final = subprocess.run(
        [
            sys.executable,
            "-m",
            "locft_dist",
            "export-delta",
            str(reference),
            "--out",
            str(setup["tmp"] / "newest.safetensors"),
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert final.returncode == 0, final.stderr[-3000:]
    for name, tensor in delta(reference).items():  # the newest checkpoint is the run's delta, bit for bit
        assert torch.equal(load_file(str(setup["tmp"] / "newest.safetensors"))[name], tensor), name
    missing = subprocess.run(
        [sys.executable, "-m", "locft_dist", "export-delta", str(reference), "--step", "999"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert (
        missing.returncode == 2 and "step-999 does not exist; kept checkpoints: steps 1, 2," in missing.stderr
    )
