"""One wave of continual editing, as ``locft edit`` runs it (``continual.previous=RUN_DIR``).

The wave starts from base + the previous delta, trains its new edits breadth-first with a seeded replay of
the earlier edits still in force, and writes a delta cumulative against the base. A run without
``continual.previous`` is wave 1: it only records its facts and chain so a later wave can follow it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from locft_dist.config import RunConfig, replay_ratio
from locft_dist.continual.history import (
    CHAIN_FILE,
    FACTS_FILE,
    Previous,
    chain_entry,
    check_previous,
    load_previous,
    sha256_file,
    supersede,
    write_chain,
    write_facts,
)
from locft_dist.continual.start import set_trainable, start_weights
from locft_dist.edits.encode import EncodedExample, Encoding, encode_pairs
from locft_dist.edits.schema import EditRequest
from locft_dist.errors import ConfigError
from locft_dist.parallel.base import Strategy
from locft_dist.sampler import Replay

logger = logging.getLogger(__name__)


class ContinualWave:
    """The continual part of a run: its place in the chain, the facts after it, replay and start weights."""

    def __init__(self, cfg: RunConfig, new_requests: Sequence[EditRequest] | None) -> None:
        self.cfg = cfg
        self.previous: Previous | None = None
        if cfg.continual.previous:
            if cfg.lora.rank:
                raise ConfigError("continual.previous needs lora.rank=0 (a delta is a full update)")
            if new_requests is None:
                raise AssertionError("a continual run loads its edit records")
            if Path(cfg.continual.previous).resolve() == Path(cfg.output.dir).resolve():
                raise ConfigError("continual.previous is output.dir: each wave needs a run directory")
            self.previous = load_previous(cfg.continual.previous)
        self.wave = self.previous.wave + 1 if self.previous else 1
        earlier = self.previous.facts if self.previous else []
        self.waves = supersede(earlier, list(new_requests or []), self.wave)
        if self.previous:
            logger.info(
                "wave %d after %s: %d new edits, %d earlier ones in force (%d superseded)",
                self.wave,
                self.previous.run_dir,
                len(self.waves.new),
                len(self.waves.pool),
                self.waves.num_superseded,
            )

    @property
    def continues(self) -> bool:
        return self.previous is not None

    def identity(self, edits_fingerprint: str) -> str:
        """The run's edit identity: the new edits, and for a later wave the delta it starts from."""
        if self.previous is None:
            return edits_fingerprint
        return f"{edits_fingerprint}+{self.previous.delta_sha256[:16]}"

    def check(self, *, model_fingerprint: str, base_fingerprint: str, parameter_names: Sequence[str]) -> None:
        if self.previous is not None:
            check_previous(
                self.previous,
                model_fingerprint=model_fingerprint,
                base_fingerprint=base_fingerprint,
                encoding=Encoding.from_config(self.cfg.edits),
                parameter_names=parameter_names,
            )

    # -- evaluation ----------------------------------------------------------------------------------------

    def all_requests(self) -> list[EditRequest]:
        """Every edit in force after this wave, or a sample seeded by train.seed of continual.eval_limit."""
        facts = self.waves.facts
        limit = self.cfg.continual.eval_limit
        if limit is not None and limit < len(facts):
            generator = torch.Generator().manual_seed(self.cfg.train.seed)
            keep = sorted(torch.randperm(len(facts), generator=generator)[:limit].tolist())
            facts = [facts[i] for i in keep]
        return [fact.request for fact in facts]

    # -- training ------------------------------------------------------------------------------------------

    def replay(self, num_new: int) -> Replay | None:
        """Where the replayed edits go in the training set (after the ``num_new`` new examples)."""
        pool = len(self.waves.pool)
        pipeline = self.cfg.train.pipeline
        if self.previous is None or pool == 0 or pipeline != "breadth_first":
            if self.previous is not None and pool and pipeline != "breadth_first":
                logger.warning("continual.replay_ratio is ignored by train.pipeline=%s", pipeline)
            return None
        ratio = replay_ratio(self.cfg.continual.replay_ratio)
        per_epoch = pool if ratio is None else min(pool, round(ratio * len(self.waves.new)))
        if per_epoch == 0:
            return None
        return Replay(num_new, pool, per_epoch, self.cfg.train.seed, self.cfg.train.epochs)

    def replay_examples(self, tokenizer, replay: Replay) -> list[EncodedExample]:
        """The pool edits some epoch replays, encoded as training encodes (only those: see ``Replay``)."""
        requests = [self.waves.pool[i].request for i in replay.used]
        return encode_pairs(
            tokenizer,
            [r.prompt for r in requests],
            [r.target_new for r in requests],
            Encoding.from_config(self.cfg.edits),
        )

    def replay_fingerprint(self, replay: Replay | None) -> str:
        """What the sampler's order depends on beyond the new examples (checked on resume)."""
        if replay is None:
            return ""
        digest = hashlib.sha256(replay.describe().encode())
        for index in replay.used:
            digest.update(json.dumps(self.waves.pool[index].request.to_json(), sort_keys=True).encode())
        return f"+{digest.hexdigest()[:16]}"

    def start(self, strategy: Strategy, model: nn.Module) -> None:
        """Set the trainable tensors to base + the previous delta (a no-op for wave 1)."""
        if self.previous is not None:
            weights = start_weights(self.cfg.model.path, self.previous.delta)
            set_trainable(strategy, model, weights, self.cfg.train)
            logger.info("starting from the delta of %s (wave %d)", self.previous.run_dir, self.previous.wave)

    # -- records -------------------------------------------------------------------------------------------

    def chain(self, edits_fingerprint: str, delta_sha256: str | None = None) -> list[dict[str, Any]]:
        earlier = list(self.previous.chain) if self.previous else []
        return [
            *earlier,
            chain_entry(
                self.wave,
                Path(self.cfg.output.dir),
                edits_path=self.cfg.edits.path,
                edits_fingerprint=edits_fingerprint,
                num_edits=len(self.waves.new),
                num_superseded=self.waves.num_superseded,
                num_facts=len(self.waves.facts),
                delta_sha256=delta_sha256,
            ),
        ]

    def delta_metadata(self, edits_fingerprint: str) -> dict[str, str]:
        """``locft.chain``: every wave's entry; this wave's delta sha256 is in continual.json only."""
        if not self.records():
            return {}
        return {"locft.chain": json.dumps(self.chain(edits_fingerprint), sort_keys=True)}

    def records(self) -> bool:
        return self.previous is not None or self.cfg.continual.keep_facts

    def write_facts(self) -> None:
        """``facts.jsonl``, before the delta: a delta on disk always has its facts next to it."""
        if self.records():
            write_facts(Path(self.cfg.output.dir) / FACTS_FILE, self.waves.facts)

    def write_chain(self, edits_fingerprint: str, delta_path: Path, base_fingerprint: str) -> None:
        """``continual.json``, after the delta (it records the delta's sha256)."""
        if not self.records():
            return
        write_chain(
            Path(self.cfg.output.dir) / CHAIN_FILE,
            self.chain(edits_fingerprint, sha256_file(delta_path)),
            base_fingerprint=base_fingerprint,
            replay_ratio=self.cfg.continual.replay_ratio,
        )

    def summary(self, replay: Replay | None) -> dict[str, Any]:
        """The ``continual`` section of metrics.json."""
        return {
            "wave": self.wave,
            "previous": str(self.previous.run_dir) if self.previous else None,
            "num_new": len(self.waves.new),
            "num_superseded": self.waves.num_superseded,
            "num_in_force": len(self.waves.facts),
            "num_replay_pool": len(self.waves.pool),
            "replay_per_epoch": replay.per_epoch if replay else 0,
            "replay_used": len(replay.used) if replay else 0,
        }
