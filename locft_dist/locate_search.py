"""``locft locate``: find where to edit by short runs of every layer x module candidate on a sample.

The best location differs by model. Each candidate is trained on a seeded sample of the edits, from the
base weights, with the run's epochs and as many optimizer steps per epoch as the full run (the batch
shrinks with the sample, so a candidate costs about the sample's share of a full run), and is scored by
its edit score (harmonic mean of reliability, generalization on the never-trained rephrase prompts, and
locality) on that sample. The base model is loaded once and the unedited model's locality predictions are
computed once and shared by all candidates; each candidate's trained weights are put back to the base
afterwards. The winner is written as a preset YAML that ``locft edit --config`` accepts.

``train_candidate`` is the one place a candidate is trained, so a faster trainer (e.g. a frozen-prefix
cache for late layers) plugs in there.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from locft_dist.config import RunConfig
from locft_dist.edit_job import encode_edits
from locft_dist.edits import EditRequest, load_edits
from locft_dist.edits.encode import EncodedExample, Encoding, pad_token_id
from locft_dist.errors import ConfigError
from locft_dist.eval import EditMetrics, EvalSettings, Evaluator
from locft_dist.locate import Location, freeze_all_but, resolve_location
from locft_dist.model import check_model_dir, load_model, load_tokenizer
from locft_dist.parallel.single import SingleProcess
from locft_dist.trainer import TrainResult, train_breadth_first

logger = logging.getLogger(__name__)


@dataclass
class Candidate:
    layer: int
    module: str
    metrics: EditMetrics | None = None
    seconds: float = 0.0

    @property
    def score(self) -> float:
        return self.metrics.edit_score_tf if self.metrics else -1.0


def sample_edits(requests: Sequence[EditRequest], num: int, seed: int) -> list[EditRequest]:
    """A seeded sample of ``num`` edits (all of them when there are fewer)."""
    if num >= len(requests):
        return list(requests)
    return random.Random(seed).sample(list(requests), num)


def train_candidate(
    model: nn.Module,
    location: Location,
    examples: Sequence[EncodedExample],
    strategy: SingleProcess,
    cfg: RunConfig,
    pad_id: int,
) -> TrainResult:
    """Train one candidate location from the current (base) weights.

    Runs the breadth-first trainer, so a candidate at layer k gets the frozen-prefix cache
    (`train.prefix_cache`): layers below k run once per edit, not once per epoch.
    """
    freeze_all_but(model, location.parameter_names)
    return train_breadth_first(model, examples, strategy, cfg.train, pad_id)


def search(
    cfg: RunConfig,
    layers: Sequence[int],
    modules: Sequence[str],
    *,
    num_sample: int,
    epochs: int | None = None,
) -> list[Candidate]:
    """Every (layer, module) candidate, trained and scored on the sample; best first.

    ``epochs`` defaults to ``train.epochs``; the batch is scaled by the sample's share of the edits, so a
    candidate takes as many optimizer steps as the full run would, each over fewer edits.
    """
    check_model_dir(cfg.model.path)
    requests = load_edits(cfg.edits.path, cfg.edits.format, limit=cfg.edits.limit).requests
    sample = sample_edits(requests, num_sample, cfg.train.seed)
    if not any(r.rephrase_prompts for r in sample) or not any(r.locality_prompts for r in sample):
        raise ConfigError(
            f"{cfg.edits.path}: locft locate scores rephrase and locality prompts; the edits lack them"
        )
    # The sample keeps the full run's optimizer steps per epoch: the batch shrinks with the sample.
    batch_size = max(1, round(cfg.train.batch_size * len(sample) / len(requests)))
    train_cfg = dataclasses.replace(
        cfg.train,
        epochs=epochs or cfg.train.epochs,
        batch_size=batch_size,
        micro_batch_size=None,
        progress=False,
    )
    search_cfg = dataclasses.replace(cfg, train=train_cfg)
    strategy = SingleProcess(cfg.model.device)
    tokenizer = load_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    examples = encode_edits(tokenizer, sample, cfg)
    pad_id = pad_token_id(tokenizer)
    model = load_model(cfg.model.path, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
    model = model.to(strategy.device)
    evaluator = Evaluator(  # probes encoded once; teacher-forced metrics only (generation is slow)
        tokenizer,
        sample,
        encoding=Encoding.from_config(cfg.edits),
        settings=EvalSettings(batch_size=cfg.eval.batch_size, generation=False),
        source=cfg.edits.path,
    )
    reference, _ = evaluator.unedited(model)  # shared by every candidate
    candidates = [Candidate(layer, module) for layer in layers for module in modules]
    logger.info(
        "locate: %d candidates, %d of %d edits, %d epochs each",
        len(candidates),
        len(sample),
        len(requests),
        train_cfg.epochs,
    )
    for candidate in candidates:
        start = time.perf_counter()
        location = resolve_location(model, [candidate.layer], [candidate.module])
        params = dict(model.named_parameters())
        base = {n: params[n].detach().clone() for n in location.parameter_names}
        torch.manual_seed(cfg.train.seed)
        train_candidate(model, location, examples, strategy, search_cfg, pad_id)
        candidate.metrics = evaluator.edited(model, reference)
        with torch.no_grad():
            for name, tensor in base.items():
                params[name].copy_(tensor)
        candidate.seconds = time.perf_counter() - start
        logger.info(
            "layer %d %s: edit score %.3f (%.1fs)",
            candidate.layer,
            candidate.module,
            candidate.score,
            candidate.seconds,
        )
    return sorted(candidates, key=lambda c: -c.score)


def format_ranking(candidates: Sequence[Candidate]) -> str:
    lines = [
        f"{'rank':>4}  {'layer':>5}  {'module':<16} {'rel':>6} {'gen':>6} {'loc':>6} {'score':>6} {'s':>6}"
    ]
    for rank, c in enumerate(candidates, start=1):
        m = c.metrics
        lines.append(
            f"{rank:>4}  {c.layer:>5}  {c.module:<16} {m.reliability_tf:>6.3f} {_fmt(m.generalization_tf)} "
            f"{_fmt(m.locality_tf)} {c.score:>6.3f} {c.seconds:>6.1f}"
        )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return f"{value:>6.3f}" if value is not None else f"{'-':>6}"


def write_preset(path: str | Path, best: Candidate) -> Path:
    """A config fragment with the chosen location, for ``locft edit --config``; written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(
        f"# locft locate: edit score {best.score:.3f} on the search sample\n"
        + yaml.safe_dump({"locate": {"layers": [best.layer], "modules": [best.module]}}, sort_keys=False),
        encoding="utf-8",
    )
    os.replace(tmp, path)
    return path


def default_layers(model_path: str) -> list[int]:
    """Every decoder layer of the model (read from its config)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(check_model_dir(model_path))
    return list(range(int(config.num_hidden_layers)))
