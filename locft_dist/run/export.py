"""``locft export-delta RUN_DIR --step N``: any checkpoint's weights as a delta file, without rerunning.

A checkpoint holds the trainable tensors as safetensors slices (one file per rank that saved); they are
assembled into full tensors on one process, whatever the world size that wrote them, and turned into the
same ``delta.safetensors`` the run writes at its end (``edited - base`` against the base on disk, with the
run's config and encoding in the metadata). A LoRA run's factors are merged first (``scale * B @ A``).
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

from locft_dist import outputs
from locft_dist.checkpoint import read_tensors_metadata, verify
from locft_dist.config import RunConfig, load_config
from locft_dist.delta import compute_delta, fingerprint_tensors, read_base_tensors, write_delta
from locft_dist.edits.encode import Encoding
from locft_dist.errors import RunDirError
from locft_dist.lora import ADAPTER
from locft_dist.model import build_meta_model
from locft_dist.run.compat import model_fingerprint
from locft_dist.run.layout import RunDir
from locft_dist.subject_rows import untie_output_layer, untied_output_metadata

logger = logging.getLogger(__name__)


def checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    """The full trainable tensors of a checkpoint directory, keyed by parameter name (one process)."""
    metadata = read_tensors_metadata(path)
    tensors = {
        key.removeprefix("model."): torch.zeros(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.items()
        if key.startswith("model.")
    }
    with warnings.catch_warnings():  # DCP warns that it assumes one process: that is what we want
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": tensors}, storage_reader=HuggingFaceStorageReader(str(path)), no_dist=True)
    return tensors


def merge_lora(tensors: dict[str, torch.Tensor], cfg: RunConfig, base: dict[str, torch.Tensor]) -> dict:
    """LoRA factors -> the localized weights with the update merged, as the run computes them."""
    merged = {}
    suffix = f".lora_A.{ADAPTER}.weight"
    for key in sorted(k for k in tensors if k.endswith(suffix)):
        module = key.removesuffix(suffix)
        lora_a, lora_b = tensors[key], tensors[f"{module}.lora_B.{ADAPTER}.weight"]
        update = (lora_b @ lora_a) * (cfg.lora.alpha / cfg.lora.rank)
        merged[f"{module}.weight"] = base[f"{module}.weight"].float() + update.float()
    return merged


def export_delta(run_dir: str | Path, *, step: int | None = None, out: str | Path | None = None) -> Path:
    """Write checkpoint ``step``'s weights (default: the newest valid one) as a delta; return its path."""
    run = RunDir(run_dir)
    if not run.config.is_file():
        raise RunDirError(f"{run.path}: no config.yaml; is this a run directory (output.dir)?")
    cfg = load_config(run.config)
    found = [(m, p) for p in run.checkpoints.glob("step-*") if (m := re.fullmatch(r"step-(\d+)", p.name))]
    steps = sorted((int(m.group(1)), p) for m, p in found if verify(p) is None)
    if not steps:
        raise RunDirError(f"{run.checkpoints}: no valid checkpoint")
    if step is None:
        step, path = steps[-1]
    else:
        path = run.checkpoints / f"step-{step}"
        if not path.is_dir():
            kept = ", ".join(str(s) for s, _ in steps)
            raise RunDirError(f"{path} does not exist; kept checkpoints: steps {kept} (output.keep_last)")
        reason = verify(path)
        if reason is not None:
            raise RunDirError(f"{path} is not a valid checkpoint: {reason}")
    out = Path(out) if out is not None else run.path / f"delta-step-{step}.safetensors"
    outputs.check_writable(out, "--out")
    run.load_record()
    if run.identity is not None and model_fingerprint(cfg.model.path) != run.identity.model:
        raise RunDirError(
            f"the base model {cfg.model.path} has changed since the run: its delta would be wrong"
        )

    tensors = checkpoint_weights(path)
    if cfg.lora.rank:
        modules = [k.removesuffix(f".lora_A.{ADAPTER}.weight") for k in tensors if ".lora_A." in k]
        base = read_base_tensors(cfg.model.path, [f"{m}.weight" for m in modules])
        edited = merge_lora(tensors, cfg, base)
    else:
        base = read_base_tensors(cfg.model.path, list(tensors))
        edited = tensors
    write_delta(
        out,
        compute_delta(edited, base),
        base_model=str(cfg.model.path),
        base_fingerprint=fingerprint_tensors(base),
        config_json=cfg.to_json(),
        encoding=Encoding.from_config(cfg.edits),
        step=step,
        extra_metadata=_untied_output_metadata(cfg),
    )
    logger.info("checkpoint %s -> %s", path, out)
    return out


def _untied_output_metadata(cfg: RunConfig) -> dict[str, str]:
    """A subject-embedding run on a tied model trained with the output layer untied: say so, as the run's
    own delta does (its structure is read on the meta device, no weights)."""
    if not cfg.locate.subject_embeddings:
        return {}
    model = build_meta_model(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    return untied_output_metadata(untie_output_layer(model))
