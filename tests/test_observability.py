"""Observability: log.jsonl, wandb offline (never a crash), and ``locft report`` plots of a real run."""

from __future__ import annotations

import json
import logging

import pytest

from locft_dist.cli import main
from locft_dist.edits import write_jsonl
from locft_dist.report import summarize

NUM_EDITS = 8


def _args(model_dir, edits, run_dir, *extra: str) -> list[str]:
    return [
        "edit",
        f"model.path={model_dir}",
        f"edits.path={edits}",
        "locate.layers=[1, 2]",
        "train.epochs=6",
        "train.batch_size=4",
        "train.lr=1e-2",
        "train.early_stop_loss=null",
        "eval.generation=false",
        f"output.dir={run_dir}",
        *extra,
    ]


@pytest.fixture(scope="module")
def tracked_run(world_model, tmp_path_factory):
    """One small edit with wandb on, offline (no key, no network), files under a temporary WANDB_DIR."""
    tmp = tmp_path_factory.mktemp("observed")
    edits = tmp / "edits.jsonl"
    write_jsonl(world_model.world.make_edits(NUM_EDITS, seed=3), edits)
    with pytest.MonkeyPatch.context() as env:
        env.delenv("WANDB_API_KEY", raising=False)
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_DIR", str(tmp / "wandb_dir"))
        env.setenv("WANDB_SILENT", "true")
        args = _args(world_model.model_dir, edits, tmp / "run", "logging.wandb_project=locft-test")
        assert main(args) == 0
    return {"tmp": tmp, "run": tmp / "run", "edits": edits, "model": world_model.model_dir}


def test_log_jsonl_has_steps_with_loss_lr_and_tokens(tracked_run):
    events = [json.loads(line) for line in (tracked_run["run"] / "log.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["event"] == "step"]
    assert len(steps) == 6 * 2
    assert all(e["tokens"] > 0 and e["lr"] == pytest.approx(1e-2) for e in steps)
    assert {"setup", "epoch", "memory", "eval", "done"} <= {e["event"] for e in events}


def test_wandb_offline_run_has_its_files_and_the_delta_artifact(tracked_run):
    runs = list((tracked_run["tmp"] / "wandb_dir" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    records = list(runs[0].glob("run-*.wandb"))  # what `wandb sync` uploads: protobuf records
    assert len(records) == 1
    data = records[0].read_bytes()
    for key in (
        "train/loss",
        "train/lr",
        "train/tokens_per_second",
        "train/edits_per_second",
        "epoch/mean_loss",
        "memory/",
        "eval/reliability_tf",
        "setup/num_edits",
        "wandb_project",
        "locft-test",
        "delta.safetensors",
    ):
        assert key.encode() in data, f"{key} was not logged"


def test_wandb_failure_never_stops_a_run(tracked_run, tmp_path, monkeypatch):
    """An unreachable server in online mode: falls back to offline; a broken wandb: a warning, no crash."""
    import wandb

    def broken_init(*args, **kwargs):
        raise RuntimeError("wandb service unavailable")

    monkeypatch.setattr(wandb, "init", broken_init)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # on the module's logger: the job's setup_logging replaces root handlers
    monkeypatch.setattr(logging.getLogger("locft_dist.tracking"), "handlers", [handler])
    args = _args(tracked_run["model"], tracked_run["edits"], tmp_path / "run", "train.epochs=1")
    assert main([*args, "logging.wandb_project=x", "logging.wandb_mode=online", "eval.enabled=false"]) == 0
    assert (tmp_path / "run" / "delta.safetensors").is_file()
    messages = " ".join(r.getMessage() for r in records)
    assert "could not start the run in online mode" in messages and "in offline mode" in messages
    assert "tracking is off for this run" in messages


def test_report_plots_the_falling_loss_and_writes_a_summary(tracked_run, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(tracked_run["run"]), "--out", str(out)]) == 0
    assert "loss.png" in capsys.readouterr().out
    for name in ("loss.png", "metrics.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    summary = summarize(tracked_run["run"])
    assert summary.last_loss < 0.5 * summary.first_loss, "the loss should fall over the run"
    assert [loss for _, loss in summary.epoch_ends] == sorted(
        (loss for _, loss in summary.epoch_ends), reverse=True
    )
    markdown = (out / "report.md").read_text()
    assert "![loss](loss.png)" in markdown and "reliability_tf" in markdown
    assert '<img src="loss.png"' in (out / "report.html").read_text()


def test_report_of_a_killed_run_and_of_a_non_run(tracked_run, tmp_path, capsys):
    killed = tmp_path / "killed"
    killed.mkdir()
    lines = (tracked_run["run"] / "log.jsonl").read_text().splitlines()[:12]
    (killed / "log.jsonl").write_text("\n".join(lines) + '\n{"event": "step", "st')  # torn last line
    assert main(["report", str(killed)]) == 0
    assert "no (running, killed or preempted)" in (killed / "report" / "report.md").read_text()
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no log.jsonl" in capsys.readouterr().err
