"""Continual editing: edits arrive in waves; each wave's delta is cumulative against the base.

- ``history``: the facts in force and the chain of runs, kept in each run directory; superseding
- ``start``: set the trainable tensors to base + the previous delta under any strategy
- ``wave``: one wave as ``locft edit`` runs it (replay plan, records, metrics)
"""

from locft_dist.continual.history import FACTS_FILE, Fact, read_facts, supersede
from locft_dist.continual.wave import ContinualWave

__all__ = ["FACTS_FILE", "ContinualWave", "Fact", "read_facts", "supersede"]
