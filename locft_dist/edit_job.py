"""The main job, ``locft edit``: set up, resume, train, export the delta, evaluate, written out plainly.

The run's lifecycle (directory contract, lock, phases, resume compatibility, signals) is ``locft_dist.run``;
this module is the recipe. Each phase is recorded in the run directory as it finishes, so a rerun of the
same command does only what is left.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from locft_dist import common_text_store
from locft_dist.config import RunConfig
from locft_dist.continual import ContinualWave
from locft_dist.continual.settings import continued_wave_config
from locft_dist.delta import compute_delta, fingerprint_tensors, read_base_tensors, write_delta
from locft_dist.edits import EditRequest, augment
from locft_dist.edits.encode import EncodedExample, Encoding, encode_pair, encode_pairs, pad_token_id
from locft_dist.edits.token_cache import TokenizedEdits, default_cache_dir, tokenized_edits
from locft_dist.errors import ConfigError, EncodingError
from locft_dist.eval import EditMetrics, save_metrics
from locft_dist.eval.in_run import RunEvaluation
from locft_dist.lora import attach_lora, merged_weights
from locft_dist.model import check_model_dir, load_tokenizer
from locft_dist.parallel import make_strategy
from locft_dist.parallel.base import Strategy
from locft_dist.parallel.memory import log_host_memory
from locft_dist.parallel.single import SingleProcess
from locft_dist.run import Identity, Run, eval_settings, model_fingerprint, resolve_paths, train_resumable
from locft_dist.runlog import RunLog, setup_logging
from locft_dist.subject_rows import (
    SubjectRows,
    choose_subject_rows,
    prompts_open_the_sequence,
    restrict_to_rows,
    untie_output_layer,
    with_continuations,
)
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
    finished: bool = False
    """The run directory held this run, finished already: nothing was done."""


def encode_edits(tokenizer, requests: list[EditRequest], cfg: RunConfig) -> list[EncodedExample]:
    """Training examples; an edit that cannot be encoded is reported with its record number."""
    encoding = Encoding.from_config(cfg.edits)
    try:
        return encode_pairs(
            tokenizer, [r.prompt for r in requests], [r.target_new for r in requests], encoding
        )
    except EncodingError:
        for number, request in enumerate(requests, start=1):  # find the offending edit for the message
            try:
                encode_pair(tokenizer, request.prompt, request.target_new, encoding)
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
        encoding=Encoding.from_config(cfg.edits),
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


def run_edit(cfg: RunConfig) -> EditOutcome:
    """Run (or continue) one editing job as configured and return where its outputs are."""
    cfg = resolve_paths(cfg)  # the run is the same whatever the working directory or path spelling
    strategy = make_strategy(cfg)
    setup_logging(strategy.is_main)
    with contextlib.ExitStack() as cleanup:  # last in, first out: the run (log, lock, signals), process group
        cleanup.callback(strategy.close)
        run = cleanup.enter_context(Run(cfg, strategy))
        # The run directory keeps the config as given (a template for any wave); a continued wave trains
        # with continual.epochs etc. in place of train.* / augment.*.
        return _run_edit(continued_wave_config(cfg), strategy, run)


def _run_edit(cfg: RunConfig, strategy: Strategy, run: Run) -> EditOutcome:
    # -- set up: bad input fails before the run directory is touched ------------------------------------
    run.signals.phase = "loading the edits"
    check_model_dir(cfg.model.path)
    run.check_writable()
    started = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    need_requests = (
        cfg.eval.enabled or augment.enabled(cfg) or cfg.continual.keep_facts or cfg.locate.subject_embeddings
    )
    loaded = load_encoded_edits(cfg, tokenizer, need_requests=need_requests or bool(cfg.continual.previous))
    requests, examples = loaded.requests, loaded.examples
    # read before the run directory is touched: a bad wordings file fails here
    wordings = augment.relation_wordings(cfg, requests) if requests else None
    continual = ContinualWave(cfg, requests)
    run_dir = Path(cfg.output.dir)
    model_id = model_fingerprint(cfg.model.path)
    plan = run.open(lambda: Identity(model=model_id, edits=continual.identity(loaded.fingerprint)))
    if plan.finished:
        logger.info("%s already finished with these settings: delta at %s", run_dir, run.dir.delta)
        return EditOutcome(strategy.is_main, run_dir, run.dir.delta, None, None, None, finished=True)
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

    run.signals.phase = "loading the model"
    if cfg.locate.subject_embeddings and not isinstance(strategy, SingleProcess):
        raise ConfigError(
            f"locate.subject_embeddings runs in one process (dist.strategy=none); got "
            f"{type(strategy).__name__} with {strategy.world_size} process(es)"
        )
    model, location = strategy.load_model(cfg.model, cfg.locate)
    if cfg.lora.rank:
        model = _attach_lora(cfg, strategy, model, location.parameter_names)
    trainable = strategy.trainable_parameters(model)
    subject_rows = _restrict_to_subject_rows(cfg, model, tokenizer, requests, trainable, wordings, model_id)
    edited_names = list(location.parameter_names) if cfg.lora.rank else [n for n, _ in trainable]
    # The base as stored on disk (not as loaded in model.dtype): what `locft apply` will add the delta to.
    # The main rank reads and hashes it; the others get the hash (they write nothing that needs the tensors).
    base_fingerprint = strategy.broadcast_object(
        fingerprint_tensors(read_base_tensors(cfg.model.path, edited_names)) if strategy.is_main else None
    )
    continual.check(
        model_fingerprint=model_id, base_fingerprint=base_fingerprint, parameter_names=edited_names
    )
    logger.info(
        "tuning %d tensors (%.2fM parameters) at layers %s: %s",
        len(trainable),
        sum(p.numel() for _, p in trainable) / 1e6,
        list(location.layers),
        ", ".join(n for n, _ in trainable),
    )
    run_log = run.start(run.cfg.to_yaml())  # as given (continual.* substitutions are not written)
    run_log.event(
        "setup",
        num_edits=len(examples),
        dataset_fingerprint=loaded.fingerprint,
        world_size=strategy.world_size,
        parameters=[n for n, _ in trainable],
        base_fingerprint=base_fingerprint,
        delta_done=plan.delta_done,
        **({"subject_rows": subject_rows.summary()} if subject_rows else {}),
    )

    # -- the unedited model: its predictions are what locality compares with ---------------------------
    eval_requests = requests[: cfg.eval.limit] if cfg.eval.limit and requests else requests
    evaluation = metrics_base = evaluation_all = metrics_all_base = None
    if cfg.eval.enabled:
        run.signals.phase = "evaluating the unedited model"
        # one process, full weights: the unedited locality generations run beside the edited ones
        paired = isinstance(strategy, SingleProcess) and not cfg.lora.rank
        evaluation = RunEvaluation(
            cfg,
            strategy,
            tokenizer,
            eval_requests,
            base_fingerprint=base_fingerprint,
            heldout_texts=read_heldout(cfg.eval.heldout_path),
            is_main=strategy.is_main,
            paired=paired,
        )
        metrics_base = evaluation.before(model)
        _reshard(model)
        if continual.continues:  # every wave so far, against the base (the delta is cumulative)
            evaluation_all = RunEvaluation(
                cfg,
                strategy,
                tokenizer,
                continual.all_requests(),
                base_fingerprint=base_fingerprint,
                is_main=strategy.is_main,
                reference_file="reference_all.safetensors",
                paired=paired,
            )
            metrics_all_base = evaluation_all.before(model)
            _reshard(model)
    # -- train, or resume: a finished run's last checkpoint holds the trained weights -------------------
    run.signals.phase = "preparing the training set"
    # Augmentation is what the *base* model says (paraphrase prefixes, locality references), also in a
    # continued wave: references from base + the previous delta would let every wave's drift stand.
    train_examples, dataset_fingerprint = augmented_examples(
        cfg,
        strategy,
        model,
        tokenizer,
        requests,
        examples,
        loaded.fingerprint,
        base_fingerprint,
        run_log,
        wordings,
    )
    continual.start(strategy, model)  # base + the previous wave's delta (a checkpoint, if any, wins)
    replay = continual.replay(len(train_examples))
    if replay is not None:
        train_examples = [*train_examples, *continual.replay_examples(tokenizer, replay)]
        dataset_fingerprint += continual.replay_fingerprint(replay)
        run_log.event("replay", **continual.summary(replay))
    logger.info(
        "training: %s, %d edits, batch %d, lr %g, up to %d epochs%s",
        cfg.train.pipeline,
        len(examples),
        cfg.train.batch_size,
        cfg.train.lr,
        cfg.train.epochs,
        f" and {cfg.train.focus_epochs} focus epochs (loss > {cfg.train.focus_loss:g})"
        if cfg.train.focus_epochs
        else "",
    )
    run.signals.phase = "training"
    if cfg.train.pipeline == "breadth_first":
        result = train_resumable(
            cfg,
            strategy,
            model,
            train_examples,
            pad_id,
            dataset_fingerprint=dataset_fingerprint,
            run_log=run_log,
            signals=run.signals,
            replay=replay,
        )
    else:  # the depth-first baseline keeps no checkpoints: a rerun trains it again
        result = train_depth_first(model, examples, strategy, cfg.train, pad_id, run_log=run_log)
    logger.info(
        "trained in %.1fs: %d steps, %.1f edits/s", result.seconds, result.num_steps, result.edits_per_second
    )
    if not run.done("trained"):
        run.mark("trained", **_train_record(result))

    # -- export the delta ----------------------------------------------------------------------------
    delta_path = run.dir.delta
    if not plan.delta_done:
        run.signals.phase = "writing the delta"
        edited = merged_weights(model, edited_names) if cfg.lora.rank else strategy.gather_trainable(model)
        if strategy.is_main:
            continual.write_facts()
            write_delta(
                delta_path,
                compute_delta(edited, read_base_tensors(cfg.model.path, edited_names)),
                base_model=str(cfg.model.path),
                base_fingerprint=base_fingerprint,
                config_json=cfg.to_json(),
                encoding=Encoding.from_config(cfg.edits),
                extra_metadata={
                    **continual.delta_metadata(loaded.fingerprint),
                    **(subject_rows.delta_metadata() if subject_rows else {}),
                },
            )
            continual.write_chain(loaded.fingerprint, delta_path, base_fingerprint)
            logger.info("wrote %s", delta_path)
        run.mark("delta", path=str(delta_path), base_fingerprint=base_fingerprint)

    # -- evaluate the edited model -------------------------------------------------------------------
    metrics = None
    if evaluation is not None:
        run.signals.phase = "evaluating the edited model"
        metrics = evaluation.after(model)
        _reshard(model)
        record = _metrics_record(metrics, metrics_base, result)
        if continual.continues:
            record["continual"] = continual.summary(replay)
        if evaluation_all is not None:
            metrics_all = evaluation_all.after(model)
            _reshard(model)
            record["all_waves"] = {"edited": metrics_all.to_dict(), "unedited": metrics_all_base.to_dict()}
        if strategy.is_main:
            save_metrics(run.dir.metrics, record)
        run_log.event("eval", **metrics.to_dict())
        run.mark("evaluated", eval=eval_settings(cfg.eval))
    run.signals.phase = "finishing"
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
    wordings: list[list[str]] | None = None,
) -> tuple[Sequence[EncodedExample], str]:
    """The breadth-first training set: the edits, then any other wordings, pseudo-paraphrases and locality
    examples.

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
        wordings=wordings,
    )
    _reshard(model)
    run_log.event(
        "augment",
        paraphrases=extra.num_paraphrases,
        wordings=extra.num_wordings,
        locality=extra.num_locality,
        key=extra.key,
    )
    return [*examples, *extra.examples], f"{fingerprint}+{extra.key}"


def _restrict_to_subject_rows(
    cfg: RunConfig, model, tokenizer, requests, trainable, wordings: list[list[str]] | None, model_id: str
) -> SubjectRows | None:
    """locate.subject_embeddings: only the rows of the edited subjects' tokens (in the prompts and any other
    wordings) get a gradient; a tied output layer is untied first (it keeps the base weight). The common
    text's continuations are cached in the run directory, so a resume neither recomputes nor changes them."""
    if not cfg.locate.subject_embeddings:
        return None
    reference_path = cfg.locate.common_text_path or cfg.augment.locality_path
    reference = augment.read_locality_prompts(reference_path)
    if cfg.locate.common_generated_tokens:  # the tokens the unedited model writes count as common too
        started = time.perf_counter()
        num_tokens = cfg.locate.common_generated_tokens
        path = Path(cfg.output.dir) / common_text_store.FILE
        key = common_text_store.cache_key(
            model=model_id, dtype=cfg.model.dtype, prompts=reference, num_tokens=num_tokens
        )
        prompts = reference
        reference, reused = common_text_store.cached(
            path,
            key,
            lambda: with_continuations(
                model,
                tokenizer,
                prompts,
                num_tokens,
                batch_size=cfg.augment.batch_size,
                progress=cfg.train.progress,
            ),
        )
        logger.info(
            "common text: the model's %d-token continuations of %d prompts, %s, %.1fs",
            num_tokens,
            len(reference),
            f"read from {path}" if reused else "generated",
            time.perf_counter() - started,
        )
    chosen = choose_subject_rows(
        tokenizer,
        requests,
        reference,
        max_share=cfg.locate.common_token_share,
        source=str(cfg.edits.path),
        other_prompts=wordings,
        avoid_sequence_start=not cfg.locate.tune_sequence_start
        and prompts_open_the_sequence(tokenizer, Encoding.from_config(cfg.edits)),
    )
    (name, weight), *others = trainable
    assert not others, "subject embeddings train one tensor"
    restrict_to_rows(weight, chosen.rows)
    untied = untie_output_layer(model)
    if untied is not None:
        chosen = replace(chosen, untied_output=untied)
    logger.info(
        "subject embeddings: %d rows of %s (%d tokens common in %s; %d edits on their rarest token; %d "
        "tokens that open a prompt left alone)",
        len(chosen.rows),
        name,
        chosen.common_tokens,
        reference_path,
        chosen.edits_on_rarest,
        chosen.sequence_start_tokens,
    )
    return chosen


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


def _train_record(result: TrainResult) -> dict[str, Any]:
    """Training totals over every attempt of the run (a resumed run's earlier parts included)."""
    return {
        "pipeline": result.pipeline,
        "num_steps": result.num_steps,
        "epochs_run": len(result.epoch_losses),
        "stopped_early": result.stopped_early,
        "seconds": round(result.seconds, 3),
        "edits_per_second": round(result.edits_per_second, 2),
        "epoch_losses": [round(loss, 6) for loss in result.epoch_losses],
        **({"focus_losses": [round(loss, 6) for loss in result.focus_losses]} if result.focus_losses else {}),
    }


def _metrics_record(metrics: EditMetrics, base: EditMetrics | None, result: TrainResult) -> dict[str, Any]:
    return {
        "edited": metrics.to_dict(),
        "unedited": base.to_dict() if base else None,
        "train": _train_record(result),
    }
