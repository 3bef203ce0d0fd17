"""Evaluation: one home for the metrics, the model passes behind them and ``locft eval``.

``metrics`` (definitions and reduction), ``probes`` (what is run, encoded as training encodes),
``passes`` and ``generate`` (the batched forwards and greedy decoding), ``reference`` (the unedited
model's predictions), ``evaluate`` (the evaluator every strategy uses), ``table`` (printed table and
metrics.json), ``job`` (``locft eval``). See docs/metrics.md for the definitions.
"""

from locft_dist.eval.evaluate import EvalSettings, Evaluator, compute_reference, evaluate_edits
from locft_dist.eval.metrics import EditMetrics, cut_at_stop, exact_match, harmonic_mean, normalize_answer
from locft_dist.eval.perplexity import perplexity_texts
from locft_dist.eval.reference import Reference
from locft_dist.eval.table import format_metrics_table, save_metrics

__all__ = [
    "EditMetrics",
    "EvalSettings",
    "Evaluator",
    "Reference",
    "compute_reference",
    "cut_at_stop",
    "evaluate_edits",
    "exact_match",
    "format_metrics_table",
    "harmonic_mean",
    "normalize_answer",
    "perplexity_texts",
    "save_metrics",
]
