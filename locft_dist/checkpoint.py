"""Everything needed to resume a run exactly: trainable weights, optimizer state, sampler, RNG.

A checkpoint is ``run_dir/checkpoints/step-N/``: safetensors files written by torch.distributed.checkpoint
(DCP) through ``HuggingFaceStorageWriter`` holding only the trainable parameters and their optimizer state
(each rank writes its own shard, so no rank materializes the whole thing; each file's header records where
its slices sit in the full tensors), ``train_state.json`` (sampler counter, losses, config, RNG, optimizer
hyperparameters) and ``manifest.json`` (size + sha256 of every other file). It is written into
``.step-N.tmp/``, the manifest last, then renamed, so a crash mid-save never leaves a directory that passes
verification. DCP reshards on load, so a run saved on W ranks (FSDP2 DTensors or a replicated plain module)
resumes on any other W.

Nothing in a checkpoint is unpickled: DCP's default file format keeps its plan in a pickled ``.metadata``
file, the safetensors format rebuilds it from the files' JSON headers; the optimizer's param groups travel
in JSON, and only tensors go through DCP. Each file is a plain safetensors file: ``locft export-delta``
turns any checkpoint's weights into a delta.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from locft_dist.errors import StorageError
from locft_dist.sampler import SamplerState

logger = logging.getLogger(__name__)

FORMAT = "locft-checkpoint/2"
"""/1 was DCP's default file format (a pickled ``.metadata``); such checkpoints are skipped, not loaded."""
_STEP_DIR = re.compile(r"^step-(\d+)$")
_REQUIRED_FILES = ("train_state.json",)
# Sharded (per-rank) state dicts of the trainable parameters only; frozen weights come from the base model.
_SAVE_OPTIONS = StateDictOptions(ignore_frozen_params=True)
# Loading: frozen params are legitimately absent; we check that nothing else is (see _check_incompatible).
_LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


def tensor_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (one per rank that held tensors)."""
    return sorted(path.glob("*.safetensors"))


def read_tensors_metadata(path: Path) -> dict[str, Any]:
    """DCP's view of a checkpoint (keys, full shapes, where each slice is), from the files' JSON headers."""
    return HuggingFaceStorageReader(str(path)).read_metadata().state_dict_metadata


def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def capture_rng() -> dict:
    """Python, torch CPU and (if initialized) CUDA generator states, JSON-serializable."""
    version, internal, gauss = random.getstate()
    rng: dict[str, Any] = {"python": [version, list(internal), gauss], "torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = [_b64(state) for state in torch.cuda.get_rng_state_all()]
    return rng


def restore_rng(rng: dict) -> None:
    if "python" in rng:
        version, internal, gauss = rng["python"]
        random.setstate((version, tuple(internal), gauss))
    if "torch" in rng:
        torch.set_rng_state(_unb64(rng["torch"]))
    if "cuda" in rng:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(rng["cuda"]):
            torch.cuda.set_rng_state_all([_unb64(state) for state in rng["cuda"]])
        else:
            logger.warning("checkpoint holds CUDA RNG states for %d devices; not restored", len(rng["cuda"]))


@dataclass
class TrainState:
    """The non-tensor part of a checkpoint (JSON). ``rng`` is rank 0's, captured by ``save``."""

    step: int
    sampler: dict
    """``SamplerState.to_dict()``: the replicated consumed-edits counter and what it is valid for."""
    epoch_losses: list[float] = field(default_factory=list)
    world_size: int = 1
    """World size that wrote the checkpoint (informational: resume works on any world size)."""
    config: dict = field(default_factory=dict)
    rng: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def sampler_state(self) -> SamplerState:
        return SamplerState(**self.sampler)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value.item() if isinstance(value, torch.Tensor) else value


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def verify(path: Path) -> str | None:
    """None if ``path`` is a complete checkpoint whose files match its manifest, else the reason."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"no readable manifest.json ({e})"
    if manifest.get("format") != FORMAT:
        if manifest.get("format") == "locft-checkpoint/1":
            return "written by an older locft in DCP's pickled format, which is never loaded"
        return f"unknown format {manifest.get('format')!r}"
    missing = [name for name in _REQUIRED_FILES if name not in files]
    if missing or not any(name.endswith(".safetensors") for name in files):
        return f"manifest lacks {missing or 'tensor files'}"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["size"]:
            return f"{name} has {file.stat().st_size} bytes, manifest says {expected['size']}"
        if _sha256(file) != expected["sha256"]:
            return f"{name} does not match its sha256"
    return None


@runtime_checkable
class TensorStateIO(Protocol):
    """A strategy that exports its trainable state as full tensors (DeepSpeed) instead of DCP state dicts.

    The tensors are laid out like FSDP's (``model.<name>``, ``optim.state.<name>.<key>``), so the same
    DCP + manifest scheme, checks and resharding apply.
    """

    def checkpoint_tensors(self, model: nn.Module, optimizer: Any) -> tuple[dict, bool]:
        """({"model": ..., "optim": {"state": ...}}, whether the optimizer has state yet); collective."""
        ...

    def checkpoint_template(self, model: nn.Module, has_optimizer_state: bool) -> dict: ...

    def load_checkpoint_tensors(self, model: nn.Module, optimizer: Any, tensors: dict) -> None: ...


class CheckpointManager:
    """Saves and finds checkpoints under ``run_dir/checkpoints``; ``save``/``load`` are collective."""

    def __init__(
        self,
        run_dir: Path,
        *,
        keep_last: int,
        rank: int,
        world_size: int,
        barrier: Callable[[], None],
        state_io: TensorStateIO | None = None,
    ) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1; got {keep_last}")
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self.barrier = barrier
        self.state_io = state_io
        self._verified: set[tuple[Path, int, int]] = set()
        """Checkpoints this process wrote or verified, by (path, manifest mtime, size): not hashed again."""

    @property
    def _no_dist(self) -> bool:
        """DCP's single-process mode: no process group, plain tensors, no collectives."""
        initialized = dist.is_available() and dist.is_initialized()
        if initialized:
            assert dist.get_world_size() == self.world_size, "world_size differs from the process group"
        else:
            assert self.world_size == 1, "world_size > 1 needs an initialized process group"
        return not initialized

    def _dcp_save(self, state_dict: dict, path: Path) -> None:
        writer = HuggingFaceStorageWriter(str(path), save_distributed=True)
        with warnings.catch_warnings():  # DCP warns that it assumes one process: that is what we want
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(state_dict, storage_writer=writer, no_dist=self._no_dist)

    def _dcp_load(self, state_dict: dict, path: Path) -> None:
        """Fill ``state_dict``'s tensors in place, reading only this rank's slices."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state_dict, storage_reader=HuggingFaceStorageReader(str(path)), no_dist=self._no_dist)

    def step_dirs(self) -> list[tuple[int, Path]]:
        """(step, dir) of every ``step-N`` directory, newest first (``.tmp`` leftovers are not listed)."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _STEP_DIR.match(p.name))]
        return sorted(found, reverse=True)

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState) -> Path:
        """Write checkpoint ``step-{step}`` atomically on all ranks together; prune to ``keep_last``."""
        tmp, final = self.dir / f".step-{step}.tmp", self.dir / f"step-{step}"
        if self.rank == 0:
            self._remove_tmp_dirs()
            tmp.mkdir(parents=True)
        self.barrier()
        # get_optimizer_state_dict "initializes" an empty optimizer with a zero-lr step, which would change
        # Adam's step count; an optimizer that has not stepped yet is saved without state instead.
        groups: list[dict] = []
        if self.state_io is not None:
            tensors, has_optimizer_state = self.state_io.checkpoint_tensors(model, optimizer)
            if has_optimizer_state:
                groups = [
                    {k: _jsonable(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups
                ]
        else:
            has_optimizer_state = bool(optimizer.state)
            tensors = {"model": _trainable_state_dict(model)}
            if has_optimizer_state:
                optim_sd = get_optimizer_state_dict(model, optimizer, options=_SAVE_OPTIONS)
                tensors["optim"] = {"state": optim_sd["state"]}
                groups = [
                    {k: _jsonable(v) for k, v in g.items() if k != "params"} for g in optim_sd["param_groups"]
                ]
        try:
            self._write(tmp, final, step, tensors, state, has_optimizer_state, groups)
        except (OSError, RuntimeError, CheckpointException) as err:
            raise self._write_failed(tmp, step, err) from None
        self.barrier()
        return final

    def _write(
        self,
        tmp: Path,
        final: Path,
        step: int,
        tensors: dict,
        state: TrainState,
        has_optimizer_state: bool,
        groups: list[dict],
    ) -> None:
        """DCP shards, then the train state, then (rank 0) the manifest and the rename."""
        self._dcp_save(tensors, tmp)
        if self.rank == 0:
            state = dataclasses.replace(state, step=step, world_size=self.world_size, rng=capture_rng())
            payload = {
                "format": FORMAT,
                "train_state": dataclasses.asdict(state),
                "has_optimizer_state": has_optimizer_state,
                "optimizer_param_groups": groups,
            }
            _write_json(tmp / "train_state.json", payload)
        self.barrier()
        if self.rank == 0:
            files = {
                p.relative_to(tmp).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
                for p in sorted(tmp.rglob("*"))
                if p.is_file()
            }
            _write_json(tmp / "manifest.json", {"format": FORMAT, "step": step, "files": files})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fd = os.open(self.dir, os.O_RDONLY)  # make the rename durable before deleting older checkpoints
            os.fsync(fd)
            os.close(fd)
            self._remember_verified(final)  # its manifest was just computed from the files themselves
            self._prune(final)
            logger.info("saved checkpoint %s", final)

    def _write_failed(self, tmp: Path, step: int, err: BaseException) -> StorageError:
        """Drop the partial ``.tmp`` directory (freeing its space); older checkpoints stay untouched."""
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, CheckpointException):
            causes = [f[0] if isinstance(f, tuple) else f for f in err.failures.values()]
            err = causes[0] if causes else err
        kept = next((str(p) for _, p in self.step_dirs() if verify(p) is None), None)
        try:
            free = f"{shutil.disk_usage(self.dir).free / 2**20:.1f} MiB free"
        except OSError:
            free = "free space unknown"
        return StorageError(
            f"could not write checkpoint step-{step} under {self.dir} ({free}; disk full or file size "
            f"limit?): {err}. "
            + (f"The previous checkpoint {kept} is intact; " if kept else "No earlier checkpoint exists; ")
            + "free space and rerun the same command to resume."
        )

    def _remove_tmp_dirs(self) -> None:
        for path in self.dir.glob(".step-*.tmp"):
            logger.info("removing incomplete checkpoint %s", path)
            shutil.rmtree(path, ignore_errors=True)

    def _manifest_key(self, path: Path) -> tuple[Path, int, int] | None:
        try:
            stat = (path / "manifest.json").stat()
        except OSError:
            return None
        return (path, stat.st_mtime_ns, stat.st_size)

    def _remember_verified(self, path: Path) -> None:
        key = self._manifest_key(path)
        if key is not None:
            self._verified.add(key)

    def _verify(self, path: Path) -> str | None:
        """``verify``, hashing each checkpoint at most once per process: the checkpoints kept from earlier
        saves are not re-read on every save (a changed manifest is verified again)."""
        key = self._manifest_key(path)
        if key is not None and key in self._verified:
            return None
        reason = verify(path)
        if reason is None and key is not None:
            self._verified.add(key)
        return reason

    def _prune(self, newest: Path) -> None:
        """Keep ``newest`` and the ``keep_last - 1`` newest other valid checkpoints; delete the rest."""
        kept = 1
        for _, path in self.step_dirs():
            if path == newest:
                continue
            reason = self._verify(path) if kept < self.keep_last else "older than keep_last"
            if reason is None:
                kept += 1
            else:
                logger.info("deleting checkpoint %s (%s)", path, reason)
                shutil.rmtree(path, ignore_errors=True)

    def _newest_valid_local(self) -> Path | None:
        """Resume: every candidate is hashed in full, whatever this process saw before."""
        for _, path in self.step_dirs():
            if (reason := verify(path)) is None:
                self._remember_verified(path)
                return path
            logger.warning("skipping checkpoint %s: %s", path, reason)
        return None

    def latest_valid(self) -> Path | None:
        """The newest checkpoint that verifies, or None; collective (rank 0 decides for all ranks)."""
        if self._no_dist or self.world_size == 1:
            return self._newest_valid_local()
        choice = [str(self._newest_valid_local() or "") if self.rank == 0 else None]
        dist.broadcast_object_list(choice, src=0)
        return Path(choice[0]) if choice[0] else None

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> TrainState:
        """Restore trainable params and optimizer state in place (any world size); returns the train state.

        Call on all ranks with the model already wrapped/sharded and a freshly built optimizer.
        """
        path = Path(path)
        payload = json.loads((path / "train_state.json").read_text())
        if payload.get("format") != FORMAT:
            raise ValueError(f"{path}: unknown checkpoint format {payload.get('format')!r}")
        if self.state_io is not None:
            tensors = self.state_io.checkpoint_template(model, payload["has_optimizer_state"])
            _check_keys(path, tensors)
            self._dcp_load(tensors, path)
            self.state_io.load_checkpoint_tensors(model, optimizer, tensors)
            if payload["has_optimizer_state"]:
                _restore_param_groups(optimizer.param_groups, payload["optimizer_param_groups"], path)
            return self._loaded(path, payload)
        optimizer.zero_grad(set_to_none=True)  # so get_optimizer_state_dict fills in a complete template
        tensors: dict[str, Any] = {"model": _trainable_state_dict(model)}
        optim_sd = None
        if payload["has_optimizer_state"]:
            optim_sd = get_optimizer_state_dict(model, optimizer, options=_SAVE_OPTIONS)
            tensors["optim"] = {"state": optim_sd["state"]}
        else:
            optimizer.state.clear()
        _check_keys(path, tensors)
        self._dcp_load(tensors, path)
        _check_incompatible(model, set_model_state_dict(model, tensors["model"], options=_LOAD_OPTIONS))
        if optim_sd is not None:
            optim_sd = {"state": tensors["optim"]["state"], "param_groups": optim_sd["param_groups"]}
            _restore_param_groups(optim_sd["param_groups"], payload["optimizer_param_groups"], path)
            set_optimizer_state_dict(model, optimizer, optim_sd, options=_LOAD_OPTIONS)
        return self._loaded(path, payload)

    def _loaded(self, path: Path, payload: dict) -> TrainState:
        state = TrainState(**payload["train_state"])
        restore_rng(state.rng)
        logger.info("resumed from %s (step %d, saved on %d ranks)", path, state.step, state.world_size)
        return state


def _trainable_state_dict(model: nn.Module) -> dict[str, Any]:
    """The trainable parameters' (sharded) state dict. ``ignore_frozen_params`` misses a frozen alias of a
    tied weight (``lm_head.weight`` when tied to the embedding is no named parameter): dropped here."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in get_model_state_dict(model, options=_SAVE_OPTIONS).items() if k in trainable}


def _flat_keys(tree: dict, prefix: str = "") -> set[str]:
    """Keys as DCP flattens nested dicts (``optim.state.<fqn>.exp_avg``)."""
    keys: set[str] = set()
    for key, value in tree.items():
        keys |= _flat_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"}
    return keys


def _check_keys(path: Path, tensors: dict) -> None:
    """Refuse, with names, a checkpoint of other trainable parameters than this run's (e.g. other layers)."""
    saved = set(read_tensors_metadata(path))
    wanted = _flat_keys(tensors)
    if saved != wanted:
        raise ValueError(
            f"{path} holds other trainable tensors than this run: missing {sorted(wanted - saved)[:5]}, "
            f"unexpected {sorted(saved - wanted)[:5]}; was the location (locate.*) changed?"
        )


def _check_incompatible(model: nn.Module, result: Any) -> None:
    """strict=False lets frozen params and buffers be absent; a missing trainable parameter is a bug."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert not result.unexpected_keys, f"unexpected keys {result.unexpected_keys}"
    missing = set(result.missing_keys) & trainable
    assert not missing, f"trainable parameters not restored: {sorted(missing)}"


def _restore_param_groups(groups: list[dict], saved: list[dict], path: Path) -> None:
    """Put the saved hyperparameters back, keeping each value's Python type (e.g. betas tuples)."""
    if len(groups) != len(saved):
        raise ValueError(f"{path}: optimizer has {len(groups)} param groups, checkpoint {len(saved)}")
    for group, saved_group in zip(groups, saved, strict=True):
        for key, value in saved_group.items():
            current = group.get(key)
            if key != "lr" and _jsonable(current) != value:
                logger.warning("optimizer %s: restoring %r from the checkpoint (was %r)", key, value, current)
            group[key] = tuple(value) if isinstance(current, tuple) else value
