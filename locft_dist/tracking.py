"""Weights & Biases logging, fed by ``RunLog`` events on the main rank; it never stops a run.

``logging.wandb_project`` turns it on. Mode ``auto`` goes online only when an API key is configured
(``WANDB_API_KEY`` or a ``wandb login``), offline otherwise (``wandb sync`` uploads later); an online start
that fails (no network) falls back to offline, and any other wandb failure logs one warning and turns
tracking off for the rest of the run. Logged: the resolved config, per step loss, lr, tokens/s and edits/s,
memory, per-epoch loss, evaluation metrics, and ``delta.safetensors`` as an artifact.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MODES = ("auto", "online", "offline", "disabled")


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str) -> str:
    """``auto`` -> ``WANDB_MODE`` if set, else online with an API key and offline without one."""
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled", "dryrun", "run"):
        return {"dryrun": "offline", "run": "online"}.get(env, env)
    return "online" if _has_api_key() else "offline"


class WandbSink:
    """Receives every ``RunLog`` event; maps them onto ``wandb.log`` / summary / artifacts."""

    def __init__(self, run: Any, run_dir: Path, log_delta: bool) -> None:
        self._run = run
        self._run_dir = run_dir
        self._log_delta = log_delta
        self._last_time: float | None = None
        self._step = 0
        """wandb drops rows logged to an older step: every row goes to the latest optimizer step."""

    @classmethod
    def start(cls, cfg: Any, run_dir: Path) -> WandbSink | None:
        """Start a wandb run as configured (``cfg`` is the ``RunConfig``), or None when off or impossible."""
        section = cfg.logging
        if not section.wandb_project:
            return None
        mode = resolve_mode(section.wandb_mode)
        if mode == "disabled":
            return None
        try:
            import wandb
        except ImportError:
            logger.warning("logging.wandb_project is set, wandb is missing: pip install 'locft-dist[wandb]'")
            return None
        kwargs = {
            "project": section.wandb_project,
            "entity": section.wandb_entity,
            "name": section.wandb_run_name or run_dir.name,
            "config": cfg.to_dict(),
            "dir": os.environ.get("WANDB_DIR") or str(run_dir),
            "resume": "allow",
            "id": section.wandb_run_id,
        }
        for attempt in (mode, "offline") if mode == "online" else (mode,):
            try:
                run = wandb.init(mode=attempt, settings=wandb.Settings(init_timeout=60), **kwargs)
                logger.info("wandb: %s run %s (%s)", attempt, run.id, run.dir)
                return cls(run, run_dir, section.wandb_log_delta)
            except Exception as err:  # network, auth, service start-up: never a reason to stop editing
                logger.warning("wandb: could not start the run in %s mode (%s)", attempt, err)
        logger.warning("wandb: tracking is off for this run")
        return None

    def event(self, kind: str, record: dict[str, Any]) -> None:
        if self._run is None:
            return
        try:
            self._event(kind, record)
        except Exception as err:
            logger.warning("wandb: %s; tracking is off for the rest of this run", err)
            self.close()

    def _event(self, kind: str, record: dict[str, Any]) -> None:
        run = self._run
        now = record.get("time")
        if kind == "step":
            values = {"train/loss": record["loss"], "train/lr": record["lr"], "train/epoch": record["epoch"]}
            if self._last_time is not None and now is not None and now > self._last_time:
                seconds = now - self._last_time
                values["train/edits_per_second"] = record["batch_edits"] / seconds
                if record.get("tokens") is not None:
                    values["train/tokens_per_second"] = record["tokens"] / seconds
            self._step = max(self._step, int(record["step"]))
            run.log(values, step=self._step)
        elif kind == "epoch":
            values = {"epoch/mean_loss": record["mean_loss"], "epoch/seconds": record["seconds"]}
            run.log(values, step=self._step)
        elif kind in ("memory", "peak_memory"):
            skip = ("time", "step", "rank")
            numbers = {f"memory/{k}": v for k, v in record.items() if k not in skip and _is_number(v)}
            run.log(numbers, step=self._step)
        elif kind == "eval":
            for key, value in record.items():
                if _is_number(value) and key != "time":
                    run.summary[f"eval/{key}"] = value
        elif kind == "setup":
            setup = {f"setup/{k}": v for k, v in record.items() if k not in ("event", "time")}
            run.config.update(setup, allow_val_change=True)
        elif kind == "done":
            delta = self._run_dir / "delta.safetensors"
            if self._log_delta and delta.is_file():
                import wandb

                artifact = wandb.Artifact(f"delta-{run.id}", type="delta")
                artifact.add_file(str(delta))
                run.log_artifact(artifact)
        if kind in ("step", "resume"):  # rates are measured between consecutive steps of one attempt
            self._last_time = now if kind == "step" else None

    def close(self) -> None:
        run, self._run = self._run, None
        if run is None:
            return
        try:
            run.finish()
            # finish() returns before the service has written everything; distributed runs leave with
            # os._exit (no atexit hooks), so wait here until the run's records are on disk.
            import wandb

            wandb.teardown()
        except Exception as err:
            logger.warning("wandb: finishing the run failed (%s)", err)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
