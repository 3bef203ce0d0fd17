"""Outputs people share: the umask decides their permissions; unwritable destinations fail first and clearly.
Also the command line as typed: overrides after options, ``locft slurm`` without SLURM, a wheel install."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from locft_dist.cli import build_parser, parse_args
from tests.conftest import REPO

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}


def locft(*args, cwd=REPO, umask: int | None = None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "locft_dist", *map(str, args)],
        capture_output=True,
        text=True,
        env=env or ENV,
        cwd=cwd,
        timeout=600,
        preexec_fn=(lambda: os.umask(umask)) if umask is not None else None,
    )


def locft_together(*commands: tuple, umask: int | None = None) -> list[subprocess.CompletedProcess]:
    """Independent ``locft`` commands at once: each spends most of its time importing torch."""
    with ThreadPoolExecutor(min(len(commands), 4)) as pool:
        return list(pool.map(lambda args: locft(*args, umask=umask), commands))


def modes(root: Path) -> dict[str, int]:
    """Permission bits of every file and directory under ``root`` (the lock file included)."""
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


@pytest.fixture(scope="module")
def edits(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("outputs") / "edits.jsonl"
    path.write_text(
        '{"prompt": "Kesso Varn works as a", "target_new": "glassblower",'
        ' "rephrase_prompts": ["Kesso Varn is a"],'
        ' "locality_prompts": [{"prompt": "Dorn Asket plays the", "answer": "violin"}]}\n'
        '{"prompt": "Rina Sol likes the colour", "target_new": "amber"}\n'
    )
    return path


def test_every_output_gets_the_mode_the_umask_gives(tiny_model_dir, edits, tmp_path):
    """Under umask 027 the group can read and others cannot: 0640 files, 0750 directories. One umask that
    is not the usual 022 catches both faults: mkstemp's 0600 kept, and a fixed 0644 whatever the umask."""
    umask = 0o027
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    config = tmp_path / "run.yaml"
    config.write_text(f"model:\n  path: {tiny_model_dir}\nedits:\n  path: {edits}\n")
    run = tmp_path / "run"
    # overrides before and after the option, as people type them
    proc = locft("edit", "train.epochs=2", "--config", config, f"output.dir={run}", "train.batch_size=1",
                 "train.progress=false", "output.checkpoint_every=1", umask=umask)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "metrics.json").read_text())["train"]["num_steps"] == 4  # 2 epochs x 2 edits
    procs = locft_together(
        ("apply", "--model", tiny_model_dir, "--delta", run / "delta.safetensors",
         "--out", tmp_path / "edited"),
        ("convert", edits, tmp_path / "converted.jsonl"),
        ("eval", "--model", tiny_model_dir, "--edits", edits, "--json", tmp_path / "eval.json",
         "--no-generation"),
        ("report", run),
        ("export-delta", run, "--step", "3"),
        umask=umask,
    )  # fmt: skip
    for done in procs:
        assert done.returncode == 0, done.stderr[-3000:]
    in_run = modes(run)
    for name in ("config.yaml", "run.json", "log.jsonl", "delta.safetensors", "metrics.json", ".locft.lock"):
        assert name in in_run, name
    for name in ("delta-step-3.safetensors", "report/report.md", "report/loss.png", "checkpoints/step-4"):
        assert name in in_run, name
    written = {f"run/{name}": mode for name, mode in in_run.items()}
    written |= {
        name: stat.S_IMODE((tmp_path / name).stat().st_mode) for name in ("converted.jsonl", "eval.json")
    }
    edited = modes(tmp_path / "edited")  # a copy of the base; what apply itself wrote follows the umask
    written |= {
        f"edited/{name}": edited.pop(name) for name in (".", "locft_applied.json", "model.safetensors")
    }
    for name, mode in written.items():
        expected = dir_mode if (tmp_path / name).is_dir() else file_mode
        assert mode == expected, (name, oct(mode), oct(expected))
    for name, mode in edited.items():  # copied files keep their own mode
        assert mode == stat.S_IMODE((tiny_model_dir / name).stat().st_mode), name


def _read_only_dir(tmp_path: Path) -> Path:
    """A directory no write can go into: a read-only tmpfs as root (root ignores mode bits), else 0555."""
    target = tmp_path / "readonly"
    target.mkdir()
    if os.geteuid() == 0:
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(target)], capture_output=True
        )
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a read-only tmpfs: {proc.stderr.decode()[-300:]}")
    else:
        target.chmod(0o555)
    return target


def test_unwritable_destinations_fail_first_with_the_path(tiny_model_dir, edits, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    readonly = _read_only_dir(tmp_path)
    try:
        cases = {
            "output.dir": ("edit", f"model.path={tiny_model_dir}", f"edits.path={edits}", "output.dir={}"),
            "output": ("convert", edits, "{}"),
            "--out": (
                "apply",
                "--model",
                tiny_model_dir,
                "--delta",
                tmp_path / "none.safetensors",
                "--out",
                "{}",
            ),
            "--json": ("eval", "--model", tiny_model_dir, "--edits", edits, "--json", "{}"),
        }
        wheres = ((blocker / "x" / "y", "is a file, not a directory"), (readonly / "x", ""))
        runs = [(what, where, reason) for what in cases for where, reason in wheres]
        commands = [[str(a).replace("{}", str(where)) for a in cases[what]] for what, where, _ in runs]
        procs = locft_together(*commands)
        for (what, where, reason), proc in zip(runs, procs, strict=True):
            assert proc.returncode == 2, (what, proc.stderr[-2000:])
            assert f"{what} {where}" in proc.stderr, proc.stderr[-2000:]
            assert (reason or f"cannot write in {readonly}") in proc.stderr, proc.stderr[-2000:]
            assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
            assert proc.stdout == "", f"{what}: work was done before the check: {proc.stdout[-500:]}"
        assert "read-only file system" in locft("convert", edits, readonly / "x").stderr or os.geteuid() != 0
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(readonly)], check=False)
        else:
            readonly.chmod(0o755)


def test_overrides_may_come_before_between_and_after_options():
    args = parse_args(
        build_parser(), ["edit", "a.b=1", "--config", "x.yaml", "c.d=2", "--help-config", "e.f=3"]
    )
    assert args.config == "x.yaml" and args.help_config and args.overrides == ["a.b=1", "c.d=2", "e.f=3"]
    with pytest.raises(SystemExit):
        parse_args(build_parser(), ["edit", "--config", "x.yaml", "a.b=1", "--no-such-option"])


def test_local_rank_from_the_deepspeed_launcher_is_accepted(monkeypatch):
    from locft_dist.cli import strip_local_rank

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert strip_local_rank(["--local_rank=3", "edit", "a=1"]) == ["edit", "a=1"]
    assert os.environ["LOCAL_RANK"] == "3"
    assert strip_local_rank(["edit", "--local-rank", "3", "a=1"]) == ["edit", "a=1"]


def test_slurm_help_is_one_text_and_a_missing_sbatch_is_a_clear_error(tmp_path):
    top, submit = locft("slurm", "--help"), locft("slurm", "submit", "--help")
    assert top.returncode == submit.returncode == 0 and top.stdout == submit.stdout
    assert "usage: locft slurm submit" in top.stdout
    no_slurm = {**ENV, "PATH": str(Path(sys.executable).parent)}  # python, but no sbatch
    proc = locft(
        "slurm", "submit", "--", "train.lr=1e-4", f"output.dir={tmp_path}/run", cwd=tmp_path, env=no_slurm
    )
    assert proc.returncode == 2 and "sbatch is not on PATH" in proc.stderr and "--dry-run" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_wheel_ships_the_sbatch_scripts_and_dry_run_points_into_the_install(tmp_path):
    """A non-editable install has no repository ``slurm/``: the scripts are package data."""
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), "."],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = tmp_path.glob("locft_dist-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("edit_torchrun.sbatch", "edit_deepspeed.sbatch"):
        assert f"locft_dist/slurm/{name}" in names, sorted(names)
    assert "locft_dist/deepspeed_configs/zero3.json" in names
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    env = {**ENV, "PYTHONPATH": str(site)}
    proc = locft("slurm", "submit", "--dry-run", "--", "train.lr=1e-4", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    script = Path(proc.stdout.split()[-2])
    assert script.is_file() and site in script.parents, proc.stdout


def test_an_invalid_counterfact_record_names_the_skip_options(tmp_path):
    bad = tmp_path / "cf.json"
    record = {"case_id": 1, "prompt": "Dorn Asket plays the", "subject": "Dorn Asket", "target_new": ""}
    bad.write_text(json.dumps([record]))
    proc = locft("convert", "--format", "counterfact", bad, tmp_path / "out.jsonl")
    assert proc.returncode == 2 and "record 1" in proc.stderr, proc.stderr[-2000:]
    assert "--skip-invalid" in proc.stderr and "edits.skip_invalid=true" in proc.stderr
