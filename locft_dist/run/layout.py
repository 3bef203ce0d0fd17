"""The run directory (``output.dir``): what each file is, and the run record of identity and phases.

    config.yaml          the resolved config of the latest attempt
    run.json             identity (content fingerprints of model and edits) and the finished phases
    log.jsonl            one JSON event per line, appended by every attempt
    checkpoints/step-N/  resumable training state (safetensors + JSON, verified by a manifest)
    delta.safetensors    the edit, once training is done
    metrics.json         the evaluation, when enabled
    facts.jsonl          the current edits of every wave so far (continual.keep_facts)
    continual.json       the chain of waves that made the delta
    .locft.lock          held by the live run's main rank

A run moves through three phases, recorded in ``run.json`` as each one finishes: ``trained`` (the final
checkpoint is saved), ``delta`` (``delta.safetensors`` is written) and ``evaluated`` (``metrics.json`` is
written, for the evaluation settings recorded with it). A rerun does only what is left, so a run killed
during its final evaluation evaluates again instead of calling itself finished.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import yaml

from locft_dist import outputs
from locft_dist.edits.augment import AUGMENT_FILE
from locft_dist.eval.reference import FILE_NAME as REFERENCE_FILE
from locft_dist.run.compat import Identity

CONTINUAL_FILES = ("facts.jsonl", "continual.json", "reference_all.safetensors")
"""Written by a run that later waves can follow (docs/continual.md)."""

logger = logging.getLogger(__name__)

RECORD_FORMAT = "locft-run/1"
PHASES = ("trained", "delta", "evaluated")
EVAL_RESULT_KEYS = ("enabled", "generation", "max_new_tokens", "limit", "heldout_path")
"""Evaluation settings that change metrics.json (the batch size does not)."""


class RunDir:
    """Paths of the run directory's files and the run record; writes happen on the main rank only."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.record_path = self.path / "run.json"
        self.log = self.path / "log.jsonl"
        self.checkpoints = self.path / "checkpoints"
        self.delta = self.path / "delta.safetensors"
        self.metrics = self.path / "metrics.json"
        self.record: dict[str, Any] = {}

    # -- reading -------------------------------------------------------------------------------------------

    def previous_config(self) -> dict[str, Any] | None:
        """The saved config tree, or None when the directory holds no run (or an unreadable config)."""
        if not self.config.is_file():
            return None
        try:
            tree = yaml.safe_load(self.config.read_text(encoding="utf-8"))
        except (yaml.YAMLError, OSError, UnicodeDecodeError) as err:
            logger.warning("%s is unreadable (%s); treating the directory as another run", self.config, err)
            return {"unreadable": str(err)}
        return tree if isinstance(tree, dict) else {"unreadable": "not a mapping"}

    def load_record(self) -> dict[str, Any]:
        """``run.json`` (empty for a run written before the record existed, or a new directory)."""
        try:
            record = json.loads(self.record_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            record = {}
        except (OSError, ValueError) as err:
            logger.warning("%s is unreadable (%s); the phases will be redone", self.record_path, err)
            record = {}
        self.record = record if isinstance(record, dict) and record.get("format") == RECORD_FORMAT else {}
        return self.record

    @property
    def identity(self) -> Identity | None:
        saved = self.record.get("identity")
        return Identity(**saved) if isinstance(saved, dict) else None

    def phase(self, name: str) -> dict[str, Any] | None:
        assert name in PHASES, name
        return self.record.get("phases", {}).get(name)

    def delta_done(self) -> bool:
        """The delta is written (a run from before the record: the file alone says so)."""
        if not self.record:
            return self.delta.is_file()
        return self.phase("delta") is not None and self.delta.is_file()

    def evaluated(self, eval_settings: dict[str, Any]) -> bool:
        """metrics.json exists and was computed with these evaluation settings."""
        if not self.record:
            return self.metrics.is_file()
        done = self.phase("evaluated")
        return done is not None and done.get("eval") == eval_settings and self.metrics.is_file()

    # -- writing (main rank) ---------------------------------------------------------------------------

    def clear(self) -> None:
        """Delete a previous run's outputs (``output.overwrite`` replacing another run)."""
        for path in (self.config, self.record_path, self.log, self.delta, self.metrics):
            path.unlink(missing_ok=True)
        for name in (AUGMENT_FILE, REFERENCE_FILE, *CONTINUAL_FILES):
            (self.path / name).unlink(missing_ok=True)
        shutil.rmtree(self.checkpoints, ignore_errors=True)
        self.record = {}

    def start(self, config_yaml: str, identity: Identity) -> None:
        """Save this attempt's config and the run's identity, keeping the phases of a continued run."""
        self.path.mkdir(parents=True, exist_ok=True)
        outputs.write_text(self.config, config_yaml)
        self.record = {
            "format": RECORD_FORMAT,
            "identity": identity.to_dict(),
            "phases": dict(self.record.get("phases", {})),
        }
        self._save()

    def mark(self, name: str, **info: Any) -> None:
        """Record phase ``name`` as finished (a later phase is only valid after the earlier ones)."""
        assert name in PHASES, name
        phases = self.record.setdefault("phases", {})
        phases[name] = info
        for later in PHASES[PHASES.index(name) + 1 :]:
            phases.pop(later, None)
        self._save()

    def _save(self) -> None:
        outputs.write_json(self.record_path, self.record, sort_keys=True)


def eval_settings(cfg_eval: Any) -> dict[str, Any]:
    """The evaluation settings recorded with the ``evaluated`` phase."""
    return {key: getattr(cfg_eval, key) for key in EVAL_RESULT_KEYS}
