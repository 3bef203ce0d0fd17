"""``delta.safetensors``: the edit as an additive float32 difference on the localized parameters.

Keys are the base model's parameter names as ``AutoModelForCausalLM.named_parameters()`` gives them;
``edited = base + delta``. Metadata: ``locft.format`` (``delta/1``), ``locft.base_model``,
``locft.base_fingerprint`` (hash of the base tensors the delta touches), ``locft.config`` and
``locft.encoding`` (how prompts and answers were tokenized, so evaluation probes what training trained);
a continual run adds ``locft.chain`` (its waves' runs, edit fingerprints and deltas; the delta is cumulative
against the base).

A matrix whose delta is zero in most rows (``locate.subject_embeddings`` moves a few embedding rows) is
stored row-sparse: its nonzero rows under its name, their indices as ``locft.rows:<name>`` (int64), and
``locft.row_sparse`` (JSON ``{name: shape}``); ``read_delta`` gives it back dense. Such a run on a model
whose output layer shares the input embedding untied them (``locft.untied_output``, JSON
``{"input": name, "output": name}``): applying the delta gives the output layer the base weight as its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from locft_dist import outputs
from locft_dist.edits.encode import Encoding
from locft_dist.errors import DeltaError
from locft_dist.model import SafetensorsCheckpoint
from locft_dist.subject_rows import untie_for_delta, untied_output

FORMAT = "delta/1"
ROWS_PREFIX = "locft.rows:"
"""Key prefix of a row-sparse tensor's row indices (not a parameter name: no module name has a colon)."""


@dataclass
class Delta:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]

    @property
    def base_fingerprint(self) -> str:
        return self.metadata["locft.base_fingerprint"]

    @property
    def encoding(self) -> Encoding | None:
        """How the run encoded its edits: ``locft.encoding``, else the ``edits`` section of an older
        delta's ``locft.config``; None when neither says."""
        if "locft.encoding" in self.metadata:
            return Encoding.from_dict(json.loads(self.metadata["locft.encoding"]))
        try:
            edits = json.loads(self.metadata.get("locft.config", "{}")).get("edits", {})
        except (json.JSONDecodeError, AttributeError):
            return None
        if not isinstance(edits, dict) or "target_prefix" not in edits:
            return None
        names = {"target_prefix", "append_eos", "chat_template", "max_length"}
        return Encoding.from_dict({k: v for k, v in edits.items() if k in names})


def fingerprint_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    """Hash of (name, shape, float32 values) in name order: independent of storage dtype and device."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to(device="cpu", dtype=torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:32]


def compute_delta(
    edited: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``edited - base`` in float32 for every key of ``edited``."""
    missing = sorted(set(edited) - set(base))
    if missing:
        raise KeyError(f"no base tensor for {missing[:3]}")
    return {
        n: (edited[n].detach().cpu().float() - base[n].detach().cpu().float()).contiguous()
        for n in sorted(edited)
    }


def write_delta(
    path: str | Path,
    delta: Mapping[str, torch.Tensor],
    *,
    base_model: str,
    base_fingerprint: str,
    config_json: str,
    encoding: Encoding | None = None,
    step: int | None = None,
    extra_metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write atomically: a temp file in the same directory, then rename. ``step``: exported from that
    checkpoint (``locft.step``) rather than at the end of the run. ``extra_metadata``: more ``locft.*``
    strings (a continual run's ``locft.chain``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    row_sparse: dict[str, list[int]] = {}
    for name, tensor in delta.items():
        tensor = tensor.detach().cpu().to(torch.float32).contiguous()
        rows = _sparse_rows(tensor)
        if rows is None:
            tensors[name] = tensor
        else:
            tensors[name] = tensor[rows].contiguous()
            tensors[ROWS_PREFIX + name] = rows
            row_sparse[name] = list(tensor.shape)
    metadata = {
        "locft.format": FORMAT,
        "locft.base_model": str(base_model),
        "locft.base_fingerprint": base_fingerprint,
        "locft.config": config_json,
    }
    if row_sparse:
        metadata["locft.row_sparse"] = json.dumps(row_sparse, sort_keys=True)
    if encoding is not None:
        metadata["locft.encoding"] = json.dumps(encoding.to_dict(), sort_keys=True)
    if step is not None:
        metadata["locft.step"] = str(step)
    metadata.update(extra_metadata or {})
    with outputs.atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def _sparse_rows(tensor: torch.Tensor) -> torch.Tensor | None:
    """Indices of the nonzero rows of a matrix that is zero in more than half of its rows, else None."""
    if tensor.dim() != 2:
        return None
    rows = torch.nonzero(tensor.ne(0).any(dim=1)).flatten()
    return rows if 2 * rows.numel() < tensor.shape[0] else None


def _densify(path: Path, tensors: dict[str, torch.Tensor], metadata: Mapping[str, str]) -> dict:
    """The row-sparse tensors back as dense ones (``locft.row_sparse``)."""
    try:
        shapes = json.loads(metadata.get("locft.row_sparse", "{}"))
    except json.JSONDecodeError as err:
        raise DeltaError(f"{path}: metadata 'locft.row_sparse' is not JSON ({err.msg})") from None
    dense = {n: t for n, t in tensors.items() if not n.startswith(ROWS_PREFIX)}
    for name, shape in shapes.items():
        rows = tensors.get(ROWS_PREFIX + name)
        values = dense.get(name)
        if rows is None or values is None or rows.dtype != torch.int64 or len(shape) != 2:
            raise DeltaError(f"{path}: row-sparse tensor {name!r} lacks its values or int64 row indices")
        if values.shape != (rows.numel(), shape[1]) or (rows.numel() and int(rows.max()) >= shape[0]):
            raise DeltaError(f"{path}: row-sparse tensor {name!r} does not fit its shape {shape}")
        full = torch.zeros(shape, dtype=values.dtype)
        full[rows] = values
        dense[name] = full
    stray = sorted(n for n in tensors if n.startswith(ROWS_PREFIX) and n[len(ROWS_PREFIX) :] not in shapes)
    if stray:
        raise DeltaError(f"{path}: tensor {stray[0]!r} is not named in metadata 'locft.row_sparse'")
    return dense


def read_delta(path: str | Path) -> Delta:
    """Load and check a delta file (format tag, float32 values)."""
    path = Path(path)
    if not path.is_file():
        raise DeltaError(f"{path}: no such delta file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises several types for a malformed header
        raise DeltaError(f"{path}: not a readable safetensors file ({err})") from None
    if metadata.get("locft.format") != FORMAT:
        raise DeltaError(
            f"{path}: metadata 'locft.format' is {metadata.get('locft.format')!r}, expected {FORMAT!r}"
        )
    if "locft.base_fingerprint" not in metadata:
        raise DeltaError(f"{path}: metadata lacks 'locft.base_fingerprint'")
    tensors = _densify(path, tensors, metadata)
    for name, tensor in tensors.items():
        if tensor.dtype != torch.float32:
            raise DeltaError(f"{path}: tensor '{name}' is {tensor.dtype}, the format requires float32")
    return Delta(tensors, metadata)


def check_base(delta: Delta, base: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse a base whose touched tensors are missing, misshaped or not the ones the delta was made on."""
    missing = sorted(set(delta.tensors) - set(base))
    if missing:
        raise DeltaError(
            f"{source} has no parameter {missing[0]!r} (and {len(missing) - 1} more) named in the delta"
        )
    for name, tensor in delta.tensors.items():
        if tuple(base[name].shape) != tuple(tensor.shape):
            raise DeltaError(
                f"{source}: parameter {name!r} has shape {tuple(base[name].shape)}, "
                f"delta has {tuple(tensor.shape)}"
            )
    found = fingerprint_tensors({n: base[n] for n in delta.tensors})
    if found != delta.base_fingerprint:
        raise DeltaError(
            f"{source} is not the base this delta was made for: "
            f"fingerprint {found} != {delta.base_fingerprint} "
            f"(delta made on {delta.metadata.get('locft.base_model', '?')})"
        )


@torch.no_grad()
def apply_delta_to_model(
    model: nn.Module, delta: Delta, *, source: str = "model", check: bool = True
) -> None:
    """Add the delta to a loaded model's parameters in place (in float32, cast back to each param's dtype);
    untie the output layer first where the delta was made so."""
    untie_for_delta(model, delta.metadata)
    params = dict(model.named_parameters())
    if check:
        check_base(delta, params, source)
    for name, tensor in delta.tensors.items():
        param = params[name]
        param.copy_((param.float() + tensor.to(param.device)).to(param.dtype))


def read_base_tensors(model_dir: str | Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Read only the named tensors from a safetensors checkpoint (never the whole model)."""
    checkpoint = SafetensorsCheckpoint(model_dir)
    missing = [n for n in names if checkpoint.key_for(n) is None]
    if missing:
        raise DeltaError(f"{model_dir} has no tensor for parameter {missing[0]!r} named in the delta")
    return {name: checkpoint.read(name) for name in names}


APPLIED_FILE = "locft_applied.json"
"""Written by ``locft apply`` into the edited model: which base and delta it is, so ``locft eval`` can label
it edited and measure locality against that base."""
APPLIED_FORMAT = "locft-applied/1"


def applied_record(model_dir: str | Path) -> dict | None:
    """What ``locft apply`` recorded in an edited model directory, or None for any other model."""
    path = Path(model_dir) / APPLIED_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == APPLIED_FORMAT else None


def apply_delta_to_dir(model_dir: str | Path, delta_path: str | Path, out_dir: str | Path) -> Path:
    """Write an edited HF model directory: a copy of ``model_dir`` whose touched shards hold base + delta.

    Only the shards that contain edited tensors are loaded and rewritten, one at a time; the output is
    assembled in a temp directory and renamed into place. ``locft_applied.json`` records the base and delta.
    A delta made on an untied output layer (``locft.untied_output``) writes the base input embedding as the
    output layer's weight beside the edited one, and ``tie_word_embeddings: false`` in config.json.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.exists():
        raise DeltaError(f"{out_dir} already exists; choose a new --out directory")
    outputs.check_writable(out_dir, "--out", directory=True)
    delta = read_delta(delta_path)
    check_base(delta, read_base_tensors(model_dir, list(delta.tensors)), str(model_dir))
    checkpoint = SafetensorsCheckpoint(model_dir)
    by_shard: dict[str, dict[str, str]] = {}
    for name in delta.tensors:
        key = checkpoint.key_for(name)
        assert key is not None, "checked by read_base_tensors"
        by_shard.setdefault(checkpoint.files[key], {})[key] = name
    untie = _output_layer_to_write(checkpoint, delta, str(model_dir))
    if untie is not None:
        by_shard.setdefault(untie[1], {})
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = outputs.make_temp_dir(out_dir.parent, prefix=f".{out_dir.name}-")
    try:
        for entry in model_dir.iterdir():
            if entry.is_file() and entry.name not in by_shard and entry.name != APPLIED_FILE:
                shutil.copy2(entry, tmp / entry.name)
        record = {
            "format": APPLIED_FORMAT,
            "base_model": str(model_dir.absolute()),
            "delta": str(Path(delta_path).absolute()),
            "tensors": sorted(delta.tensors),
            "metadata": delta.metadata,
        }
        outputs.write_json(tmp / APPLIED_FILE, record, sort_keys=True)
        for shard, keys in by_shard.items():
            with safe_open(str(model_dir / shard), framework="pt") as handle:
                shard_meta = handle.metadata()
            tensors = load_file(str(model_dir / shard))
            if untie is not None and shard == untie[1]:  # the base value, before the delta is added
                tensors[untie[0]] = tensors[untie[2]].clone()
            for key, name in keys.items():
                base = tensors[key]
                tensors[key] = (base.float() + delta.tensors[name]).to(base.dtype).contiguous()
            with outputs.atomic_path(tmp / shard) as part:  # safetensors alone would create it 0600
                save_file(tensors, str(part), metadata=shard_meta)
        if untie is not None:
            _write_untied_config(model_dir, tmp, output_key=untie[0], shard=untie[1])
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _output_layer_to_write(
    checkpoint: SafetensorsCheckpoint, delta: Delta, source: str
) -> tuple[str, str, str] | None:
    """(output key, its shard, input key) when the delta was made on an untied output layer that this
    checkpoint does not store (it is tied); None otherwise."""
    record = untied_output(delta.metadata)
    if record is None or checkpoint.key_for(record["output"]) is not None:
        return None
    input_key = checkpoint.key_for(record["input"])
    if input_key is None:
        raise DeltaError(f"{source} has no tensor for {record['input']!r} (metadata 'locft.untied_output')")
    return record["output"], checkpoint.files[input_key], input_key


def _write_untied_config(model_dir: Path, out_dir: Path, *, output_key: str, shard: str) -> None:
    """config.json with ``tie_word_embeddings: false`` (a nested text config too), and the shard index,
    if any, naming the output layer's new tensor."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    config["tie_word_embeddings"] = False
    if isinstance(config.get("text_config"), dict):
        config["text_config"]["tie_word_embeddings"] = False
    outputs.write_json(out_dir / "config.json", config, indent=2)
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text(encoding="utf-8"))
        index["weight_map"][output_key] = shard
        outputs.write_json(out_dir / index_path.name, index, indent=2)
