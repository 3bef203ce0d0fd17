"""``locft report RUN_DIR``: loss/lr and metric plots (PNG) plus a short Markdown and HTML summary.

Reads only ``log.jsonl`` and ``metrics.json``, so it works on a finished, a running or a killed run. A
resumed run logs some steps twice (those after its last checkpoint): the last record of a step wins. Files
go to ``RUN_DIR/report/``, each written to a temporary name and renamed.
"""

from __future__ import annotations

import html
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from locft_dist import outputs
from locft_dist.errors import LocftError, RunDirError

logger = logging.getLogger(__name__)

METRICS = (
    "reliability_tf",
    "generalization_tf",
    "locality_tf",
    "reliability_em",
    "generalization_em",
    "locality_em",
    "reliability_wild",
    "generalization_wild",
    "locality_wild",
    "edit_score_tf",
    "edit_score_em",
    "edit_score_wild",
)


@dataclass
class RunSummary:
    """What the report shows, read back from a run directory."""

    run_dir: Path
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    epoch_ends: list[tuple[int, float]] = field(default_factory=list)
    """(step at the end of the epoch, mean loss of the epoch)."""
    setup: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    resumed_at: list[int] = field(default_factory=list)
    """Step each resume continued from (one entry per attempt after the first that resumed training)."""
    train: dict[str, Any] = field(default_factory=dict)
    """Training totals over every attempt (the ``trained`` event, or metrics.json's ``train``)."""
    finished: bool = False
    seconds: float | None = None

    @property
    def num_resumes(self) -> int:
        return len(self.resumed_at)

    @property
    def first_loss(self) -> float | None:
        return self.losses[0] if self.losses else None

    @property
    def last_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None


def read_events(path: Path) -> list[dict[str, Any]]:
    """The records of ``log.jsonl``; a torn last line (a killed run) is skipped with a warning."""
    events = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s: line %d is not JSON (a run killed mid-write?); skipped", path, number)
            continue
        if isinstance(record, dict):
            events.append(record)
    return events


def summarize(run_dir: str | Path) -> RunSummary:
    run_dir = Path(run_dir)
    log = run_dir / "log.jsonl"
    if not log.is_file():
        raise RunDirError(f"{run_dir}: no log.jsonl; is this a run directory (output.dir)?")
    summary = RunSummary(run_dir)
    by_step: dict[int, tuple[float, float]] = {}
    epochs: dict[int, tuple[int, float]] = {}  # epoch -> (its last step, mean loss)
    last_step = 0
    for event in read_events(log):
        kind = event.get("event")
        if kind == "step":
            last_step = int(event["step"])
            by_step[last_step] = (float(event["loss"]), float(event.get("lr", 0.0)))
        elif kind == "edit":  # depth-first: one record per edit
            by_step[int(event["position"]) + 1] = (float(event["loss"]), 0.0)
        elif kind == "epoch":
            epochs[int(event["epoch"])] = (last_step, float(event["mean_loss"]))
        elif kind == "setup":
            summary.setup = {k: v for k, v in event.items() if k not in ("event", "time", "parameters")}
            summary.setup["num_parameters_tensors"] = len(event.get("parameters", []))
        elif kind == "resume":
            summary.resumed_at.append(int(event.get("step", 0)))
        elif kind == "trained":
            summary.train = {k: v for k, v in event.items() if k not in ("event", "time")}
        elif kind == "done":
            summary.finished = True
            summary.seconds = event.get("seconds")
    for step in sorted(by_step):
        summary.steps.append(step)
        summary.losses.append(by_step[step][0])
        summary.lrs.append(by_step[step][1])
    summary.epoch_ends = [epochs[e] for e in sorted(epochs)]
    metrics_path = run_dir / "metrics.json"
    if metrics_path.is_file():
        summary.metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        summary.train = summary.metrics.get("train") or summary.train
    if not summary.steps:
        raise RunDirError(f"{log}: no training steps logged yet")
    return summary


def _pyplot() -> Any:
    """matplotlib with the Agg backend (files only, no display), or a clear error naming the extra."""
    try:
        import matplotlib
    except ImportError:
        raise LocftError("locft report needs matplotlib: pip install 'locft-dist[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(summary: RunSummary, out: Path) -> Path:
    plt = _pyplot()

    fig, (ax_loss, ax_lr) = plt.subplots(
        2, 1, figsize=(7, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    ax_loss.plot(summary.steps, summary.losses, lw=1, label="batch loss")
    if summary.epoch_ends:
        x, y = zip(*summary.epoch_ends, strict=True)
        ax_loss.plot(x, y, "o-", ms=4, label="epoch mean")
    for number, step in enumerate(summary.resumed_at):
        label = "resumed" if number == 0 else None
        ax_loss.axvline(step, color="tab:red", ls="--", lw=0.8, label=label)
    if min(summary.losses) > 0:
        ax_loss.set_yscale("log")
    ax_loss.set_ylabel("target cross-entropy")
    ax_loss.set_title(f"training loss: {summary.run_dir.name}")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(summary.steps, summary.lrs, lw=1, color="tab:gray")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    return _save_figure(fig, out)


def plot_metrics(summary: RunSummary, out: Path) -> Path | None:
    edited = summary.metrics.get("edited") or {}
    unedited = summary.metrics.get("unedited") or {}
    names = [m for m in METRICS if edited.get(m) is not None]
    if not names:
        return None
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.4
    xs = range(len(names))
    ax.bar([x - width / 2 for x in xs], [unedited.get(m) or 0.0 for m in names], width, label="unedited")
    ax.bar([x + width / 2 for x in xs], [edited[m] for m in names], width, label="edited")
    ax.set_xticks(list(xs), names, rotation=30, ha="right")
    ax.set_ylim(0, 1.2)
    ax.set_title("edit metrics (higher is better)")
    ax.legend(loc="upper right", ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save_figure(fig, out)


def _save_figure(fig: Any, out: Path) -> Path:
    import matplotlib.pyplot as plt

    try:
        with outputs.atomic_path(out) as tmp, open(tmp, "wb") as handle:
            fig.savefig(handle, format="png", dpi=110)
    finally:
        plt.close(fig)
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def summary_rows(summary: RunSummary) -> list[tuple[str, str]]:
    train = summary.train
    resumes = _fmt(summary.num_resumes)
    if summary.resumed_at:
        resumes += f" (from step {', '.join(map(str, summary.resumed_at))}; times cover every attempt)"
    rows = [
        ("edits", _fmt(summary.setup.get("num_edits"))),
        ("ranks", _fmt(summary.setup.get("world_size"))),
        ("optimizer steps", _fmt(summary.steps[-1])),
        ("epochs", _fmt(len(summary.epoch_ends))),
        ("loss, first step", _fmt(summary.first_loss)),
        ("loss, last step", _fmt(summary.last_loss)),
        ("resumes", resumes),
        ("finished", "yes" if summary.finished else "no (running, killed or preempted)"),
    ]
    if train:
        rows += [
            ("training seconds", _fmt(train.get("seconds"))),
            ("edits/s", _fmt(train.get("edits_per_second"))),
            ("stopped early", _fmt(train.get("stopped_early"))),
        ]
    return rows


def metric_rows(summary: RunSummary) -> list[tuple[str, str, str]]:
    edited = summary.metrics.get("edited") or {}
    unedited = summary.metrics.get("unedited") or {}
    names = [*METRICS, "perplexity"]
    return [(m, _fmt(unedited.get(m)), _fmt(edited.get(m))) for m in names if m in edited]


def render_markdown(summary: RunSummary, images: list[Path]) -> str:
    lines = [f"# Run report: `{summary.run_dir}`", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary_rows(summary)]
    metrics = metric_rows(summary)
    if metrics:
        lines += ["", "| metric | unedited | edited |", "|---|---|---|"]
        lines += [f"| {m} | {u} | {e} |" for m, u, e in metrics]
    lines += [""] + [f"![{p.stem}]({p.name})" for p in images]
    return "\n".join(lines) + "\n"


def render_html(summary: RunSummary, images: list[Path]) -> str:
    esc = html.escape
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in summary_rows(summary))
    metrics = "".join(
        f"<tr><th>{esc(m)}</th><td>{esc(u)}</td><td>{esc(e)}</td></tr>" for m, u, e in metric_rows(summary)
    )
    table = (
        f"<table><tr><th>metric</th><th>unedited</th><th>edited</th></tr>{metrics}</table>" if metrics else ""
    )
    imgs = "".join(f'<p><img src="{esc(p.name)}" alt="{esc(p.stem)}"></p>' for p in images)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(str(summary.run_dir))}</title>"
        "<style>body{font-family:sans-serif;max-width:900px;margin:2em auto}"
        "th,td{padding:2px 10px;text-align:left}</style></head><body>"
        f"<h1>Run report: {esc(str(summary.run_dir))}</h1><table>{rows}</table>{table}{imgs}</body></html>\n"
    )


def _write_text(path: Path, text: str) -> None:
    outputs.write_text(path, text)


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write loss.png, metrics.png (when metrics.json exists), report.md and report.html; return paths."""
    summary = summarize(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "report"
    outputs.check_writable(out, "report directory", directory=True)
    out.mkdir(parents=True, exist_ok=True)
    images = [plot_loss(summary, out / "loss.png")]
    metrics_png = plot_metrics(summary, out / "metrics.png")
    if metrics_png is not None:
        images.append(metrics_png)
    _write_text(out / "report.md", render_markdown(summary, images))
    _write_text(out / "report.html", render_html(summary, images))
    return [*images, out / "report.md", out / "report.html"]
