"""The printed metrics table and metrics.json: the same metric names in every command."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from locft_dist import outputs
from locft_dist.eval.metrics import EditMetrics

TABLE_ROWS = (
    ("Reliability TF", "reliability_tf"),
    ("Generalization TF", "generalization_tf"),
    ("Locality TF", "locality_tf"),
    ("Edit score TF", "edit_score_tf"),
    ("Reliability EM", "reliability_em"),
    ("Generalization EM", "generalization_em"),
    ("Locality EM", "locality_em"),
    ("Edit score EM", "edit_score_em"),
    ("Reliability WILD", "reliability_wild"),
    ("Generalization WILD", "generalization_wild"),
    ("Locality WILD", "locality_wild"),
    ("Edit score WILD", "edit_score_wild"),
    ("Perplexity", "perplexity"),
    ("Perplexity (base)", "perplexity_base"),
    ("Edits", "num_edits"),
    ("Rephrase probes", "num_rephrases"),
    ("Locality probes", "num_locality"),
)
"""(label, metrics.json key): TF = teacher-forced (EasyEdit), EM = greedy exact match with a budget of the
answer's length + 3 tokens, WILD = greedy up to eval.max_new_tokens (see docs/metrics.md)."""


def _format_value(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def format_metrics_table(columns: dict[str, EditMetrics | dict[str, Any]], title: str | None = None) -> str:
    """A fixed-width table, one row per metric and one column per run, for logs and the demo."""
    dicts = {
        name: m.to_dict() if isinstance(m, EditMetrics) else dict(m or {}) for name, m in columns.items()
    }
    header = ["metric", *dicts]
    rows = [[label, *(_format_value(d.get(key)) for d in dicts.values())] for label, key in TABLE_ROWS]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))])

    rule = "-" * len(line(header))
    lines = ([title] if title else []) + [line(header), rule, *(line(r) for r in rows)]
    return "\n".join(lines)


def save_metrics(path: str | Path, metrics: dict[str, Any]) -> None:
    """Write metrics as JSON atomically (temp file + rename): a killed job never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def default(value: Any) -> Any:
        if isinstance(value, EditMetrics):
            return value.to_dict()
        raise TypeError(f"cannot write {type(value).__name__} to metrics JSON")

    outputs.write_text(path, json.dumps(metrics, indent=2, sort_keys=True, default=default) + "\n")
