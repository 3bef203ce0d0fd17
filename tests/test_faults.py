"""Faults: kill -9 mid-save, a full disk, a rank dying mid-step, two runs into one directory.

docs/reliability.md lists every fault tried here (and in test_checkpoint/test_distributed) with its outcome.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from locft_dist.checkpoint import CheckpointManager, TrainState, verify
from locft_dist.cli import main
from locft_dist.edits import EditRequest, write_jsonl
from locft_dist.errors import RunDirBusyError, StorageError
from locft_dist.run.lock import RunDirLock
from tests.conftest import REPO, SENTENCES
from tests.dist_workers.save_loop import SAMPLER
from tests.test_distributed import ENV, kill9, start, wait_for_step, workers


def _manager(run_dir) -> CheckpointManager:
    return CheckpointManager(run_dir, keep_last=2, rank=0, world_size=1, barrier=lambda: None)


def _model_and_optimizer(width: int = 256) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Linear(width, width)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.ones(1, width)).sum().backward()
    optimizer.step()
    return model, optimizer


def _save(manager, step, model, optimizer):
    return manager.save(step, model, optimizer, TrainState(step=step, sampler=SAMPLER))


def _newest_step(run_dir) -> int:
    return max((step for step, _ in _manager(run_dir).step_dirs()), default=0)


def _tmp_dirs(run_dir) -> list[Path]:
    return list((run_dir / "checkpoints").glob(".step-*.tmp"))


def test_kill9_during_checkpoint_save_leaves_the_previous_one_valid(tmp_path):
    """A process saving back to back is SIGKILLed mid-save; the newest valid checkpoint is whole.

    Each kill is aimed at a save in progress (a ``.step-N.tmp`` directory on disk) after a random delay; a
    kill that lands just after the rename still checks the "kill between saves" case. Attempts go on until
    two kills landed inside a save, so a slow disk (long fsyncs between saves) cannot make the test vacuous.
    """
    from tests.dist_workers.save_loop import make

    rng = random.Random(os.getpid())
    killed_mid_save = attempts = 0
    while killed_mid_save < 2 and attempts < 12:
        attempts += 1
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "tests/dist_workers/save_loop.py"), str(tmp_path)],
            env=ENV,
            cwd=REPO,
            stderr=subprocess.DEVNULL,
        )
        before = _newest_step(tmp_path)
        deadline = time.time() + 120
        while _newest_step(tmp_path) <= before and time.time() < deadline:  # this process is saving
            time.sleep(0.02)
        while not _tmp_dirs(tmp_path) and time.time() < deadline:  # a save has begun
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.02))
        proc.kill()
        proc.wait()
        killed_mid_save += bool(_tmp_dirs(tmp_path))
        manager = _manager(tmp_path)
        latest = manager.latest_valid()
        assert latest is not None
        model, optimizer = make()
        model(torch.ones(1, 512)).sum().backward()
        optimizer.step()
        state = manager.load(latest, model, optimizer)
        assert latest.name == f"step-{state.step}"
        for param in model.parameters():
            assert torch.all(param == state.step), f"{latest} loaded weights of another step"
    assert killed_mid_save >= 2, f"only {killed_mid_save} of {attempts} kills landed inside a save"


@contextlib.contextmanager
def _file_size_limit(num_bytes: int):
    """RLIMIT_FSIZE: writes past ``num_bytes`` fail with EFBIG (Python ignores SIGXFSZ); unprivileged."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (num_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@contextlib.contextmanager
def _small_tmpfs(path, size: str):
    """A real full disk: a tmpfs of ``size`` (needs mount permission; skipped where it is refused)."""
    path.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or 'not permitted'}); EFBIG case ran")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.parametrize("how", ["file_size_limit", "full_tmpfs"])
def test_disk_full_during_save_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, how):
    model, optimizer = _model_and_optimizer()
    with contextlib.ExitStack() as stack:
        run_dir = tmp_path / "run"
        if how == "full_tmpfs":
            run_dir = stack.enter_context(_small_tmpfs(tmp_path / "mnt", "2m"))
        manager = _manager(run_dir)
        first = _save(manager, 1, model, optimizer)
        size = sum(p.stat().st_size for p in first.iterdir())
        if how == "full_tmpfs":  # leave less room than one more checkpoint needs
            free = os.statvfs(run_dir).f_bavail * os.statvfs(run_dir).f_frsize
            (run_dir / "ballast").write_bytes(b"\0" * max(free - size // 2, 0))
            limit = contextlib.nullcontext()
        else:
            limit = _file_size_limit(size // 4)
        with limit, pytest.raises(StorageError) as info:
            _save(manager, 2, model, optimizer)
        message = str(info.value)
        assert "could not write checkpoint step-2" in message and str(first) in message, message
        assert verify(first) is None and manager.latest_valid() == first
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-1"], "partial save left"


EDITS = [EditRequest(s.rsplit(" ", 1)[0], s.rsplit(" ", 1)[1]) for s in SENTENCES]


def _args(tiny_model_dir, tmp_path, epochs: int) -> list[str]:
    edits = tmp_path / "edits.jsonl"
    write_jsonl(EDITS * 1, edits)
    return [
        f"model.path={tiny_model_dir}",
        f"edits.path={edits}",
        "locate.layers=[1, 2]",
        "train.batch_size=2",
        f"train.epochs={epochs}",
        "train.progress=false",
        "train.early_stop_loss=null",
        "eval.enabled=false",
        "output.checkpoint_every=1",
        "dist.timeout_minutes=1",
    ]


def _alive(pids: list[int]) -> list[int]:
    """Those of ``pids`` still running (zombies awaiting their parent's wait count as gone)."""
    alive = []
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            if Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
                alive.append(pid)
    return alive


def test_a_rank_dying_mid_step_makes_every_rank_exit(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(2, run_dir, _args(tiny_model_dir, tmp_path, epochs=10_000))
    try:
        wait_for_step(run_dir, 2, proc)
        ranks = workers(proc)
        assert len(ranks) == 2, ranks
        os.kill(ranks[1], 9)
        killed = time.time()
        proc.wait(timeout=90)
        seconds = time.time() - killed
    finally:
        kill9(proc)
    assert proc.returncode != 0
    assert not _alive(ranks), f"ranks still running: {_alive(ranks)}"
    assert seconds < 60, f"the job took {seconds:.0f}s to exit after a rank died"
    print(f"all ranks exited {seconds:.1f}s after rank 1 was killed")


def test_lock_is_exclusive_and_released(tmp_path):
    first = RunDirLock(tmp_path)
    first.acquire()
    holder = subprocess.run(
        [sys.executable, "-c", f"import locft_dist.run.lock as m; m.RunDirLock({str(tmp_path)!r}).acquire()"],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=REPO,
    )
    assert holder.returncode != 0 and f"pid {os.getpid()}" in holder.stderr, holder.stderr[-2000:]
    first.release()
    with RunDirLock(tmp_path) as again:
        assert again.held
    with pytest.raises(RunDirBusyError), RunDirLock(tmp_path), RunDirLock(tmp_path):
        pass


def test_concurrent_runs_into_one_directory_are_refused_and_a_dead_runs_lock_is_taken(
    tiny_model_dir, tmp_path, capsys
):
    run_dir = tmp_path / "run"
    args = _args(tiny_model_dir, tmp_path, epochs=10_000)
    first = start(1, run_dir, args)
    try:
        wait_for_step(run_dir, 1, first)
        assert main(["edit", *args, f"output.dir={run_dir}"]) == 2
        stderr = capsys.readouterr().err
        assert "in use by a running job" in stderr and f"pid {first.pid}" in stderr, stderr
        assert first.poll() is None, "the refused run must not disturb the running one"
    finally:
        kill9(first)
    assert (run_dir / ".locft.lock").exists(), "kill -9 leaves the lock file behind"
    overwrite = [*_args(tiny_model_dir, tmp_path, epochs=1), "output.overwrite=true", f"output.dir={run_dir}"]
    assert main(["edit", *overwrite]) == 0
    assert (run_dir / "delta.safetensors").is_file()
    events = [json.loads(line)["event"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert events[-1] == "done"
