"""The main job, ``locft edit``: setup -> reference eval -> train -> delta -> eval, written out plainly."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from locft_dist.config import RunConfig
from locft_dist.delta import compute_delta, fingerprint_tensors, read_base_tensors, write_delta
from locft_dist.edits import EditRequest, augment
from locft_dist.edits.encode import EncodedExample, Encoding, encode_pair, encode_pairs, pad_token_id
from locft_dist.edits.token_cache import TokenizedEdits, default_cache_dir, tokenized_edits
from locft_dist.errors import ConfigError, EncodingError, RunDirBusyError
from locft_dist.evaluate import (
    EditMetrics,
    compute_reference,
    evaluate_edits,
    save_metrics,
)
from locft_dist.lora import attach_lora, merged_weights
from locft_dist.model import check_model_dir, load_tokenizer
from locft_dist.parallel import make_strategy
from locft_dist.parallel.base import Strategy
from locft_dist.parallel.memory import log_host_memory
from locft_dist.parallel.single import SingleProcess
from locft_dist.resumable import clear_checkpoints, train_resumable
from locft_dist.run_lock import RunDirLock
from locft_dist.runlog import RunLog, setup_logging
from locft_dist.tracking import WandbSink
from locft_dist.trainer import TrainResult, train_depth_first

logger = logging.getLogger(__name__)


@dataclass
class EditOutcome:
    is_main: bool
    run_dir: Path
    delta_path: Path
    train: TrainResult | None
    metrics: EditMetrics | None
    metrics_base: EditMetrics | None


def encode_edits(tokenizer, requests: list[EditRequest], cfg: RunConfig) -> list[EncodedExample]:
    """Training examples; an edit that cannot be encoded is reported with its record number."""
    kwargs = {
        "target_prefix": cfg.edits.target_prefix,
        "append_eos": cfg.edits.append_eos,
        "max_length": cfg.edits.max_length,
    }
    try:
        return encode_pairs(
            tokenizer, [r.prompt for r in requests], [r.target_new for r in requests], **kwargs
        )
    except EncodingError:
        for number, request in enumerate(requests, start=1):  # find the offending edit for the message
            try:
                encode_pair(tokenizer, request.prompt, request.target_new, **kwargs)
            except EncodingError as err:
                raise EncodingError(f"{cfg.edits.path}: edit {number}: {err}") from None
        raise


def load_encoded_edits(cfg: RunConfig, tokenizer, *, need_requests: bool) -> TokenizedEdits:
    """The edit file as encoded examples, through the on-disk token cache unless ``edits.token_cache`` is
    off; the parsed records come along only when ``need_requests`` (evaluation, augmentation)."""
    cache_dir = None
    if cfg.edits.token_cache:
        cache_dir = cfg.edits.token_cache_dir or default_cache_dir()
    return tokenized_edits(
        cfg.edits.path,
        tokenizer,
        format=cfg.edits.format,
        skip_invalid=cfg.edits.skip_invalid,
        limit=cfg.edits.limit,
        encode_kwargs={
            "target_prefix": cfg.edits.target_prefix,
            "append_eos": cfg.edits.append_eos,
            "max_length": cfg.edits.max_length,
        },
        cache_dir=cache_dir,
        need_requests=need_requests,
    )


def read_heldout(path: str | None) -> list[str] | None:
    """Held-out passages for perplexity: plain text (one per line) or JSONL with a "text" field."""
    if not path:
        return None
    texts = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if line:
                texts.append(json.loads(line)["text"] if line.startswith("{") else line)
    return texts


def check_run_dir(cfg: RunConfig) -> Path | None:
    """The finished delta if this exact run already completed; refuse a directory holding another run."""
    run_dir = Path(cfg.output.dir)
    saved = run_dir / "config.yaml"
    if cfg.output.overwrite or not saved.is_file():
        return None
    try:
        previous = yaml.safe_load(saved.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        previous = None
    if _results_config(previous) != _results_config(cfg.to_dict()):
        raise ConfigError(
            f"{run_dir} holds a run with a different config; use a new output.dir or output.overwrite=true"
        )
    delta = run_dir / "delta.safetensors"
    return delta if delta.is_file() else None


def _results_config(tree: Any) -> Any:
    """The config minus the ``logging`` section: where a run is tracked does not change its results."""
    return {k: v for k, v in tree.items() if k != "logging"} if isinstance(tree, dict) else tree


def start_run_dir(cfg: RunConfig) -> Path:
    """Create the run directory (clearing a previous run's outputs when overwriting) and save the config."""
    run_dir = Path(cfg.output.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.output.overwrite:
        for name in ("delta.safetensors", "metrics.json", "log.jsonl", augment.AUGMENT_FILE):
            (run_dir / name).unlink(missing_ok=True)
        clear_checkpoints(run_dir)
    tmp = run_dir / ".config.yaml.tmp"
    tmp.write_text(cfg.to_yaml(), encoding="utf-8")
    os.replace(tmp, run_dir / "config.yaml")
    return run_dir


def run_edit(cfg: RunConfig) -> EditOutcome:
    """Run one editing job as configured and return where its outputs are."""
    strategy = make_strategy(cfg)
    setup_logging(strategy.is_main)
    lock = RunDirLock(cfg.output.dir)
    with contextlib.ExitStack() as cleanup:  # last in, first out: run log, lock, process group
        cleanup.callback(strategy.close)
        cleanup.callback(lock.release)
        return _run_edit(cfg, strategy, lock, cleanup)


def lock_run_dir(strategy: Strategy, lock: RunDirLock) -> None:
    """The main rank locks ``output.dir``; if another live run holds it, every rank raises together."""
    error = None
    if strategy.is_main:
        try:
            lock.acquire()
        except RunDirBusyError as err:
            error = err
    busy = strategy.all_reduce_max(torch.tensor([int(error is not None)], device=strategy.device))
    if error is not None:
        raise error
    if busy.item():
        raise RunDirBusyError(f"{lock.path.parent} is in use by a running job (see the main rank's message)")


def _run_edit(
    cfg: RunConfig, strategy: Strategy, lock: RunDirLock, cleanup: contextlib.ExitStack
) -> EditOutcome:
    check_model_dir(cfg.model.path)  # fail on bad input before the run directory is touched
    started = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    loaded = load_encoded_edits(cfg, tokenizer, need_requests=cfg.eval.enabled or augment.enabled(cfg))
    requests, examples = loaded.requests, loaded.examples
    run_dir = Path(cfg.output.dir)
    lock_run_dir(strategy, lock)
    finished = check_run_dir(cfg)
    if finished is not None:
        logger.info("%s already finished with this config: delta at %s", run_dir, finished)
        return EditOutcome(strategy.is_main, run_dir, finished, None, None, None)
    torch.manual_seed(cfg.train.seed)
    logger.info(
        "%d edits from %s (%s; %d skipped, %d duplicates), %s in %.1fs",
        len(examples),
        cfg.edits.path,
        loaded.format,
        loaded.num_skipped,
        loaded.num_duplicates,
        "mapped from the token cache" if loaded.from_cache else "parsed and tokenized",
        time.perf_counter() - started,
    )
    log_host_memory("after loading and encoding the edits")
    pad_id = pad_token_id(tokenizer)

    model, location = strategy.load_model(cfg.model, cfg.locate)
    if cfg.lora.rank:
        model = _attach_lora(cfg, strategy, model, location.parameter_names)
    trainable = strategy.trainable_parameters(model)
    edited_names = list(location.parameter_names) if cfg.lora.rank else [n for n, _ in trainable]
    # The base as stored on disk (not as loaded in model.dtype): what `locft apply` will add the delta to.
    # The main rank reads and hashes it; the others get the hash (they write nothing that needs the tensors).
    base_fingerprint = strategy.broadcast_object(
        fingerprint_tensors(read_base_tensors(cfg.model.path, edited_names)) if strategy.is_main else None
    )
    logger.info(
        "tuning %d tensors (%.2fM parameters) at layers %s: %s",
        len(trainable),
        sum(p.numel() for _, p in trainable) / 1e6,
        list(location.layers),
        ", ".join(n for n, _ in trainable),
    )
    if strategy.is_main:
        start_run_dir(cfg)
    run_log = RunLog(run_dir / "log.jsonl", enabled=strategy.is_main)
    cleanup.callback(run_log.close)
    if strategy.is_main:
        run_log.add_sink(WandbSink.start(cfg, run_dir))
    run_log.event(
        "setup",
        num_edits=len(examples),
        dataset_fingerprint=loaded.fingerprint,
        world_size=strategy.world_size,
        parameters=[n for n, _ in trainable],
        base_fingerprint=base_fingerprint,
    )

    eval_requests = requests[: cfg.eval.limit] if cfg.eval.limit and requests else requests
    heldout = read_heldout(cfg.eval.heldout_path)
    reference = metrics_base = None
    if cfg.eval.enabled:
        logger.info("evaluating the unedited model on %d edits", len(eval_requests))
        reference = compute_reference(model, tokenizer, eval_requests, **_eval_kwargs(cfg))
        metrics_base = evaluate_edits(
            model, tokenizer, eval_requests, reference, heldout_texts=heldout, **_eval_kwargs(cfg)
        )
        _reshard(model)

    train_examples, dataset_fingerprint = augmented_examples(
        cfg, strategy, model, tokenizer, requests, examples, loaded.fingerprint, base_fingerprint, run_log
    )
    logger.info(
        "training: %s, %d edits, batch %d, lr %g, up to %d epochs",
        cfg.train.pipeline,
        len(examples),
        cfg.train.batch_size,
        cfg.train.lr,
        cfg.train.epochs,
    )
    if cfg.train.pipeline == "breadth_first":
        result = train_resumable(
            cfg,
            strategy,
            model,
            train_examples,
            pad_id,
            dataset_fingerprint=dataset_fingerprint,
            run_log=run_log,
        )
    else:
        result = train_depth_first(model, examples, strategy, cfg.train, pad_id, run_log=run_log)
    logger.info(
        "trained in %.1fs: %d steps, %.1f edits/s", result.seconds, result.num_steps, result.edits_per_second
    )

    edited = merged_weights(model, edited_names) if cfg.lora.rank else strategy.gather_trainable(model)
    delta_path = run_dir / "delta.safetensors"
    if strategy.is_main:
        write_delta(
            delta_path,
            compute_delta(edited, read_base_tensors(cfg.model.path, edited_names)),
            base_model=str(cfg.model.path),
            base_fingerprint=base_fingerprint,
            config_json=cfg.to_json(),
            encoding=Encoding.from_config(cfg.edits),
        )
        logger.info("wrote %s", delta_path)

    metrics = None
    if cfg.eval.enabled:
        metrics = evaluate_edits(
            model,
            tokenizer,
            eval_requests,
            reference,
            heldout_texts=heldout,
            perplexity_base=metrics_base.perplexity if metrics_base else None,
            **_eval_kwargs(cfg),
        )
        _reshard(model)
        if strategy.is_main:
            save_metrics(run_dir / "metrics.json", _metrics_record(metrics, metrics_base, result))
        run_log.event("eval", **metrics.to_dict())
    run_log.event("done", seconds=time.time() - run_log.start)
    run_log.close()
    strategy.barrier()
    return EditOutcome(strategy.is_main, run_dir, delta_path, result, metrics, metrics_base)


def augmented_examples(
    cfg: RunConfig,
    strategy: Strategy,
    model,
    tokenizer,
    requests: list[EditRequest] | None,
    examples: Sequence[EncodedExample],
    fingerprint: str,
    base_fingerprint: str,
    run_log: RunLog,
) -> tuple[Sequence[EncodedExample], str]:
    """The breadth-first training set: the edits, then any pseudo-paraphrases and locality examples.

    The dataset fingerprint (checked on resume) covers the augmentation, so a checkpoint made with other
    extra examples is refused.
    """
    if not augment.enabled(cfg):
        return examples, fingerprint
    if cfg.train.pipeline != "breadth_first":
        logger.warning("augment.* is ignored by train.pipeline=%s (breadth_first only)", cfg.train.pipeline)
        return examples, fingerprint
    extra = augment.build_augmentation(
        model,
        tokenizer,
        requests,
        cfg,
        edits_fingerprint=fingerprint,
        base_fingerprint=base_fingerprint,
        write=strategy.is_main,
        shard=strategy,
    )
    _reshard(model)
    run_log.event("augment", paraphrases=extra.num_paraphrases, locality=extra.num_locality, key=extra.key)
    return [*examples, *extra.examples], f"{fingerprint}+{extra.key}"


def _attach_lora(cfg: RunConfig, strategy: Strategy, model, parameter_names):
    if strategy.world_size != 1 or not isinstance(strategy, SingleProcess):
        raise ConfigError(
            f"lora.rank > 0 runs single-process only (dist.strategy=none); got {type(strategy).__name__} "
            f"with {strategy.world_size} process(es): use lora.rank=0 to tune the full localized weights"
        )
    return attach_lora(model, parameter_names, cfg.lora, seed=cfg.train.seed)


def _reshard(model) -> None:
    """FSDP2 leaves the root's parameters (the final norm) gathered after a forward without backward."""
    reshard = getattr(model, "reshard", None)
    if callable(reshard):
        reshard()


def _eval_kwargs(cfg: RunConfig) -> dict[str, Any]:
    return {
        "batch_size": cfg.eval.batch_size,
        "generation": cfg.eval.generation,
        "target_prefix": cfg.edits.target_prefix,
    }


def _metrics_record(metrics: EditMetrics, base: EditMetrics | None, result: TrainResult) -> dict[str, Any]:
    return {
        "edited": metrics.to_dict(),
        "unedited": base.to_dict() if base else None,
        "train": {
            "pipeline": result.pipeline,
            "num_steps": result.num_steps,
            "epochs_run": len(result.epoch_losses),
            "stopped_early": result.stopped_early,
            "seconds": round(result.seconds, 3),
            "edits_per_second": round(result.edits_per_second, 2),
            "epoch_losses": [round(loss, 6) for loss in result.epoch_losses],
        },
    }
