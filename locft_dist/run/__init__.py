"""The run's lifecycle, one owner for it: the run directory, its lock, phases, resume compatibility, signals.

- ``layout``: what each file of ``output.dir`` is; the run record (identity and finished phases)
- ``lock``: one live run per directory
- ``compat``: is a rerun the same run (resolved paths, content fingerprints, the keys that change results)
- ``signals``: SIGTERM/SIGUSR1/Ctrl-C stop cleanly (save at a step boundary, or stop at once elsewhere)
- ``resume``: breadth-first training that checkpoints and resumes exactly
- ``session``: one attempt: open (lock + compare + what is left), start, mark phases
- ``export``: any checkpoint's weights as a delta (``locft export-delta``)
"""

from locft_dist.run.compat import Identity, model_fingerprint, resolve_paths
from locft_dist.run.layout import RunDir, eval_settings
from locft_dist.run.lock import RunDirLock
from locft_dist.run.resume import train_resumable
from locft_dist.run.session import Plan, Run
from locft_dist.run.signals import EXIT_INTERRUPTED, EXIT_PREEMPTED, RunSignals, Stopped

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_PREEMPTED",
    "Identity",
    "Plan",
    "Run",
    "RunDir",
    "RunDirLock",
    "RunSignals",
    "Stopped",
    "eval_settings",
    "model_fingerprint",
    "resolve_paths",
    "train_resumable",
]
