"""Evaluation inside ``locft edit``: the unedited model before training, the edited model after it.

The unedited model's pass yields its metrics and the locality Reference at once, and both are stored in
``output.dir/reference.safetensors`` under a key of everything they depend on, so a resumed or repeated
run reads them instead of evaluating the unedited model again. The same code runs under every strategy:
each rank evaluates its share of the edits and the strategy's reductions combine them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from locft_dist.config import RunConfig
from locft_dist.edits.encode import Encoding
from locft_dist.edits.schema import EditRequest
from locft_dist.eval.base_weights import BaseWeights
from locft_dist.eval.evaluate import EvalSettings, Evaluator
from locft_dist.eval.generate import Ranks, any_rank
from locft_dist.eval.metrics import EditMetrics
from locft_dist.eval.passes import model_device
from locft_dist.eval.prefix import PrefixReuse, reuse_budget_bytes
from locft_dist.eval.reference import FILE_NAME, Reference, load_reference, save_reference
from locft_dist.model import SafetensorsCheckpoint

logger = logging.getLogger(__name__)


def model_key(model_dir: str | Path, dtype: str, base_fingerprint: str) -> str:
    """A cheap identity of a model directory as evaluated: its config, the headers of its weight files
    (names, shapes, dtypes, offsets), the fingerprint of the tensors a run edits and the compute dtype."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    for name in sorted(set(SafetensorsCheckpoint(model_dir).files.values())):
        with open(model_dir / name, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            digest.update(name.encode() + handle.read(size))
    digest.update(f"{dtype}:{base_fingerprint}".encode())
    return digest.hexdigest()[:32]


def settings_of(cfg: RunConfig) -> EvalSettings:
    return EvalSettings(
        batch_size=cfg.eval.batch_size,
        generation=cfg.eval.generation,
        max_new_tokens=cfg.eval.max_new_tokens,
        progress=cfg.train.progress,
    )


class RunEvaluation:
    """``before(model)`` on the unedited model (or the stored Reference), ``after(model)`` on the edited."""

    def __init__(
        self,
        cfg: RunConfig,
        ranks: Ranks,
        tokenizer,
        requests: Sequence[EditRequest],
        *,
        base_fingerprint: str,
        heldout_texts: Sequence[str] | None = None,
        is_main: bool = True,
        reference_file: str = FILE_NAME,
        paired: bool = False,
    ) -> None:
        """``reference_file``: where in the run directory the unedited predictions are kept (one file per
        evaluated edit set). ``paired`` (one process, full-weight tuning): the unedited model's locality
        generations are decoded beside the edited model's, with the trainable tensors' unedited values
        swapped in (``BaseWeights``), and only as far as the two agree."""
        self.evaluator = Evaluator(
            tokenizer,
            requests,
            encoding=Encoding.from_config(cfg.edits),
            settings=settings_of(cfg),
            ranks=ranks,
            source=cfg.edits.path,
        )
        self.ranks = ranks
        self.heldout = list(heldout_texts or [])
        self.is_main = is_main
        self.path = Path(cfg.output.dir) / reference_file
        record = {
            "model": model_key(cfg.model.path, cfg.model.dtype, base_fingerprint),
            "probes": self.evaluator.probes.key,
            "generation": cfg.eval.generation,
            "max_new_tokens": cfg.eval.max_new_tokens,
            "heldout": hashlib.sha256(json.dumps(self.heldout).encode()).hexdigest(),
            "paired": paired,
        }
        self.key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:32]
        self.reference: Reference | None = None
        self.metrics_before: EditMetrics | None = None
        self.prefix_reuse_gib = cfg.eval.prefix_reuse_gib
        self.prefix: PrefixReuse | None = None
        self.paired = paired and cfg.eval.generation
        self.base_weights: BaseWeights | None = None

    def before(self, model: nn.Module) -> EditMetrics:
        """The unedited model's metrics; computes and stores the Reference unless the run directory has it."""
        device = model_device(model)
        if self.paired:  # the model is unedited here: keep its trainable tensors for the edited pass
            names = [n for n, p in model.named_parameters() if p.requires_grad]
            self.base_weights = BaseWeights(model, names)
        stored = load_reference(self.path, self.key)
        if not any_rank(self.ranks, stored is None or stored.metrics is None, device):
            logger.info("unedited model: reference predictions and metrics read from %s", self.path)
            self.reference, self.metrics_before = stored, EditMetrics.from_dict(stored.metrics)
            return self.metrics_before
        logger.info("evaluating the unedited model on %d edits", self.evaluator.probes.num_edits)
        self.prefix = PrefixReuse.for_model(model, self.ranks, reuse_budget_bytes(self.prefix_reuse_gib))
        reference, metrics = self.evaluator.unedited(
            model, self.heldout, forward=self.prefix, defer_locality_generation=self.paired
        )
        reference.key = self.key
        if self.is_main:
            save_reference(self.path, reference)
        logger.info("evaluated the unedited model in %.1fs", self.evaluator.seconds.get("unedited", 0.0))
        self.reference, self.metrics_before = reference, metrics
        return metrics

    def after(self, model: nn.Module) -> EditMetrics:
        """The edited model's metrics (locality against the Reference from ``before``)."""
        logger.info("evaluating the edited model on %d edits", self.evaluator.probes.num_edits)
        base = self.metrics_before.perplexity if self.metrics_before else None
        if self.prefix is not None:
            self.prefix.replay()
        metrics = self.evaluator.edited(
            model,
            self.reference,
            self.heldout,
            perplexity_base=base,
            forward=self.prefix,
            unedited_weights=self.base_weights.swapped if self.base_weights else None,
        )
        self.prefix = None  # frees the recorded states
        logger.info("evaluated the edited model in %.1fs", self.evaluator.seconds.get("edited", 0.0))
        return metrics
