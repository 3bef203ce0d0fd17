"""DeepSpeed ZeRO-3 (or ZeRO-2) strategy: the engine owns sharding, gradient reduction and the step.

Order of operations, so that no rank ever holds the whole model under ZeRO-3: the HF DeepSpeed config
integration (``HfDeepSpeedConfig``) makes ``from_pretrained`` build the model under ``deepspeed.zero.Init``,
so each parameter is partitioned as soon as it is created -> resolve the location and freeze everything
else -> build our optimizer over the localized parameters only -> ``deepspeed.initialize`` with it as the
client optimizer, so ZeRO keeps fp32 partitions and Adam moments for the localized parameters only.

The delta gathers the trainable fp32 masters to rank 0 only, one tensor at a time. Checkpoints hold the
trainable fp32 masters and Adam moments as dim-0-sharded DTensors in FSDP2's layout, keyed by HF parameter
name, through the same DCP + manifest scheme as FSDP: under ZeRO-3 each rank's flat partitions are moved
into its row chunk by one all-to-all per tensor, so no rank holds a whole weight or moment, and a DeepSpeed
checkpoint resumes on any world size and under FSDP (see docs/deepspeed.md).

Launch: ``deepspeed --num_gpus N launch/edit.py dist.strategy=deepspeed ...`` (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from locft_dist.config import LocateConfig, ModelConfig, RunConfig, TrainConfig
from locft_dist.errors import ConfigError
from locft_dist.locate import Location, freeze_all_but, resolve_location
from locft_dist.model import DTYPES, check_model_dir
from locft_dist.optim import build_optimizer, set_lr
from locft_dist.parallel.memory import log_memory
from locft_dist.parallel.process_group import ProcessGroupCollectives, init_process_group
from locft_dist.parallel.reshard import flat_to_rows, local_rows, rows_to_flat

logger = logging.getLogger(__name__)

_ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")
# Keys DeepSpeed batch/optimizer settings that we own: "auto" (or absent) is filled from our config.
_OWNED_BY_US = ("optimizer", "scheduler")


def resolve_deepspeed_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """Read ``dist.deepspeed_config`` and fill every ``"auto"`` from our config; refuse disagreements.

    Our trainer forms the global batch itself (``train.batch_size`` edits, each rank its share, gradient
    accumulation over ``train.micro_batch_size``), so DeepSpeed is told one micro-batch of a rank's share
    per step and no accumulation: ``train_batch_size = ceil(batch_size / world_size) * world_size``.
    """
    path = cfg.dist.deepspeed_config
    if path:
        try:
            ds = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ConfigError(f"dist.deepspeed_config: cannot read {path}: {err}") from None
    else:
        ds = {"zero_optimization": {"stage": 3}}
    for key in _OWNED_BY_US:
        if key in ds:
            raise ConfigError(
                f"dist.deepspeed_config: remove '{key}' from {path}: the optimizer and lr schedule come "
                "from train.* (so that they cannot disagree across strategies)"
            )
    share = math.ceil(cfg.train.batch_size / world_size)
    filled = {
        "train_micro_batch_size_per_gpu": share,
        "gradient_accumulation_steps": 1,
        "train_batch_size": share * world_size,
        "gradient_clipping": cfg.train.max_grad_norm or 0.0,
    }
    for key, value in filled.items():
        given = ds.get(key, "auto")
        if given != "auto" and given != value:
            raise ConfigError(
                f"dist.deepspeed_config: {key}={given!r} in {path} disagrees with our config ({value!r}, "
                'from train.batch_size/train.max_grad_norm and the world size); set it to "auto"'
            )
        ds[key] = value
    precision = {"bfloat16": "bf16", "float16": "fp16"}.get(cfg.dist.param_dtype or cfg.model.dtype)
    for section in ("bf16", "fp16"):
        enabled = ds.get(section, {}).get("enabled", False)
        if enabled == "auto":
            ds[section]["enabled"] = section == precision
        elif enabled and section != precision:
            raise ConfigError(
                f"dist.deepspeed_config: {section}.enabled=true but model.dtype/dist.param_dtype is "
                f"{cfg.dist.param_dtype or cfg.model.dtype}"
            )
    zero = ds.setdefault("zero_optimization", {"stage": 3})
    if zero.get("stage") not in (2, 3):
        raise ConfigError(
            f"dist.deepspeed_config: zero_optimization.stage must be 2 or 3, got {zero.get('stage')}"
        )
    for key, value in list(zero.items()):
        if value == "auto":  # bucket sizes etc.: DeepSpeed's own defaults
            del zero[key]
    # Our optimizer is torch Adam/AdamW over the localized parameters, also when ZeRO offloads it to CPU.
    ds["zero_allow_untested_optimizer"] = True
    ds.setdefault("zero_force_ds_cpu_optimizer", False)
    ds.setdefault("steps_per_print", 1 << 30)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def _strip(name: str) -> str:
    return name.removeprefix("module.")


class DeepSpeedStrategy(ProcessGroupCollectives):
    """ZeRO-2/3 over all ranks of the job; the model handed to the trainer is the DeepSpeed engine."""

    supports_prefix_cache = True
    """The partial forward runs through the engine, so ZeRO-3's per-module hooks gather what it uses."""
    defers_step_bookkeeping = False
    """The engine saves checkpoints at gradient-accumulation boundaries only: a step's checkpoint hook
    runs before the next step's backward."""

    def __init__(self, cfg: RunConfig) -> None:
        import deepspeed

        if "RANK" not in os.environ:  # one process started without a launcher: a group of one
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        self.rank, self.world_size, self.device = init_process_group(
            cfg.model.device, cfg.dist.timeout_minutes
        )
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
        self.mesh = init_device_mesh(self.device.type, (self.world_size,))  # checkpoints' DTensor layout
        self.cfg = cfg
        self.ds_config = resolve_deepspeed_config(cfg, self.world_size)
        self.stage = int(self.ds_config["zero_optimization"]["stage"])
        self.engine: Any = None
        self._hf_ds_config: Any = None
        if self.device.type == "cpu" and (
            self.ds_config.get("bf16", {}).get("enabled") or self.ds_config.get("fp16", {}).get("enabled")
        ):
            logger.warning("DeepSpeed bf16/fp16 on CPU is untested here; the CPU tests run fp32")

    # -- model -------------------------------------------------------------------------------------------

    def load_model(self, model_cfg: ModelConfig, locate_cfg: LocateConfig) -> tuple[nn.Module, Location]:
        """ZeRO-3: build and load under zero.Init (partitioned as created) -> freeze -> engine."""
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        model_dir = check_model_dir(model_cfg.path)
        # Must stay alive while from_pretrained runs: it is how transformers learns to use zero.Init.
        self._hf_ds_config = HfDeepSpeedConfig(self.ds_config) if self.stage == 3 else None
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            dtype=DTYPES[model_cfg.dtype],
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=model_cfg.trust_remote_code,
        )
        model.eval()
        if self.stage == 3:  # built under zero.Init: every parameter was partitioned as it was created
            whole = [n for n, p in model.named_parameters() if not hasattr(p, "ds_id") or p.numel() > 0]
            assert not whole, f"from_pretrained did not partition under zero.Init: {whole[:3]}"
        location = resolve_location(model, locate_cfg.layers, locate_cfg.modules)
        return self.wrap_model(model, location.parameter_names), location

    def wrap_model(self, model: nn.Module, trainable_names: list[str] | None = None) -> nn.Module:
        """Freeze (if names are given), then hand the model and our optimizer to ``deepspeed.initialize``."""
        import deepspeed

        if trainable_names is not None:
            freeze_all_but(model, trainable_names)
        # ZeRO keeps fp32 master partitions of these (and only these) itself, also under bf16.
        optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], self.cfg.train)
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config, dist_init_required=False
        )
        engine.eval()
        self.engine = engine
        # Right after zero.Init nothing is gathered: a ZeRO-3 parameter is its partition (ds_tensor) only.
        # (Parameters under stage3_param_persistence_threshold stay gathered after their first use.)
        local = sum(
            p.numel() + (p.ds_tensor.numel() if hasattr(p, "ds_tensor") else 0) for p in model.parameters()
        )
        logger.info(
            "ZeRO-%d: rank %d holds %d of %d parameter elements",
            self.stage,
            self.rank,
            local,
            sum(_full_numel(p) for p in model.parameters()),
        )
        log_memory("after building the DeepSpeed engine", self.device)
        return engine

    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(_strip(n), p) for n, p in model.named_parameters() if p.requires_grad]

    # -- optimizer (owned by the engine) ------------------------------------------------------------------

    def build_optimizer(self, model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
        """The engine's ZeRO optimizer (built in ``wrap_model`` over the localized parameters only)."""
        assert model is self.engine, "build_optimizer needs the engine returned by load_model/wrap_model"
        return self.engine.optimizer

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        self.engine.zero_grad()

    def optimizer_step(self, optimizer: torch.optim.Optimizer, lr: float, max_norm: float | None) -> None:
        """Set the lr and let the engine step (it clips with ``gradient_clipping`` and zeroes gradients)."""
        assert (max_norm or 0.0) == self.ds_config["gradient_clipping"], (
            "gradient_clipping was filled from us"
        )
        set_lr(optimizer, lr)
        self.engine.step()

    def check_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Invariant, measured from the engine: ZeRO's fp32 partitions hold the localized parameters only."""
        trainable = sum(_full_numel(p) for _, p in self.trainable_parameters(model))
        local = optimizer_state_numel(optimizer)
        assert local["moments"] in (0, 2 * local["partition"]), local
        total = int(self.all_reduce_sum(torch.tensor(local["partition"], dtype=torch.int64)).item())
        # Partitions are padded to a multiple of the world size: at most world_size - 1 per tensor.
        num_tensors = len(self.trainable_parameters(model))
        assert trainable <= total <= trainable + num_tensors * self.world_size, (trainable, total)

    def backward(self, loss: torch.Tensor) -> None:
        # ZeRO averages gradients over ranks; the trainer's loss is already a share of the global mean.
        self.engine.backward(loss * self.world_size)

    # -- communication -------------------------------------------------------------------------------------

    def gather_trainable(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """fp32 master copies of the trainable tensors on rank 0 only, one tensor at a time; the other ranks
        get an empty dict (a collective: every rank must call it).

        ZeRO-3: each rank's fp32 partition is gathered to rank 0 (no all-gather). ZeRO-2 keeps the model whole
        on every rank by design; its fp32 master of one tensor is assembled on every rank and dropped at once
        outside rank 0.
        """
        out = {}
        for name, param in self.trainable_parameters(model):
            if self.stage == 3:
                full = self._gather_partition(param, self._local_fp32(param, None))
            else:
                full = self._full_fp32(param, None)
                full = full if self.rank == 0 else None
            if full is not None:
                out[name] = full.detach().to(device="cpu", dtype=torch.float32).clone()
        return out

    def _local_fp32(self, param: nn.Parameter, key: str | None) -> torch.Tensor:
        """ZeRO-3: this rank's flat fp32 partition of the master weight (``key=None``) or an Adam moment."""
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        local = (
            safe_get_local_fp32_param(param) if key is None else safe_get_local_optimizer_state(param, key)
        )
        assert local is not None and local.numel() == param.ds_tensor.numel(), "a ZeRO-3 trainable partition"
        return local

    def _full_fp32(self, param: nn.Parameter, key: str | None) -> torch.Tensor:
        """ZeRO-2: the whole fp32 master weight (``key=None``) or Adam moment of one tensor."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        full = safe_get_full_fp32_param(param) if key is None else safe_get_full_optimizer_state(param, key)
        assert full is not None, "a parameter managed by the ZeRO optimizer"
        return full.reshape(_full_shape(param))

    def _gather_partition(self, param: nn.Parameter, local: torch.Tensor) -> torch.Tensor | None:
        """ZeRO-3 flat partitions joined into the whole tensor on rank 0 (None elsewhere)."""
        parts = [torch.empty_like(local) for _ in range(self.world_size)] if self.rank == 0 else None
        dist.gather(local.contiguous(), parts, dst=0)
        if parts is None:
            return None
        return torch.cat(parts)[: _full_numel(param)].view(_full_shape(param))

    # -- checkpoint state (used by checkpoint.CheckpointManager) ------------------------------------------

    def _rows(self, param: nn.Parameter, key: str | None) -> torch.Tensor:
        """This rank's dim-0 chunk (FSDP2's layout) of the fp32 master weight or an Adam moment."""
        if self.stage == 3:  # one all-to-all from the flat partitions: nobody holds the whole tensor
            return flat_to_rows(self._local_fp32(param, key), _full_shape(param), self.rank, self.world_size)
        return local_rows(self._full_fp32(param, key), self.rank, self.world_size)

    def _dtensor(self, rows: torch.Tensor, param: nn.Parameter) -> DTensor:
        shape = _full_shape(param)
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(
            rows.to(device=self.device, dtype=torch.float32),
            self.mesh,
            [Shard(0)],
            run_check=False,
            shape=shape,
            stride=stride,
        )

    def checkpoint_tensors(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, bool]:
        """Trainable fp32 weights and Adam moments as dim-0-sharded DTensors keyed like FSDP2's DCP state
        dicts: each rank holds and writes its chunk only (collective)."""
        inner = _inner_optimizer(optimizer)
        has_state = bool(inner.state)
        params = self.trainable_parameters(model)
        tensors: dict[str, Any] = {"model": {n: self._dtensor(self._rows(p, None), p) for n, p in params}}
        if has_state:
            step = next(iter(inner.state.values()))["step"]
            state = {}
            for name, param in params:
                entry: dict[str, Any] = {"step": torch.as_tensor(step, dtype=torch.float32).detach().clone()}
                for key in _ADAM_STATE_KEYS:
                    entry[key] = self._dtensor(self._rows(param, key), param)
                state[name] = entry
            tensors["optim"] = {"state": state}
        return tensors, has_state

    def checkpoint_template(self, model: nn.Module, has_optimizer_state: bool) -> dict:
        """Zero DTensors of the layout ``checkpoint_tensors`` writes, for DCP to load into."""

        def zeros(param: nn.Parameter) -> DTensor:
            shape = local_rows(
                torch.empty(_full_shape(param), device="meta"), self.rank, self.world_size
            ).shape
            return self._dtensor(torch.zeros(shape, device=self.device), param)

        params = self.trainable_parameters(model)
        tensors: dict[str, Any] = {"model": {n: zeros(p) for n, p in params}}
        if has_optimizer_state:
            tensors["optim"] = {
                "state": {
                    n: {"step": torch.zeros(()), **{k: zeros(p) for k in _ADAM_STATE_KEYS}} for n, p in params
                }
            }
        return tensors

    @torch.no_grad()
    def load_checkpoint_tensors(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict
    ) -> None:
        """Put loaded chunks into the engine: the module's partitions, fp32 masters and Adam state."""
        inner = _inner_optimizer(optimizer)
        if "optim" in tensors:
            steps = {float(s["step"]) for s in tensors["optim"]["state"].values()}
            assert len(steps) == 1, f"Adam step counts differ across parameters: {steps}"
            step = steps.pop()
            for flat in fp32_partitions(optimizer):  # Adam initializes lazily: create the state to overwrite
                state = inner.state[flat]
                for key in _ADAM_STATE_KEYS:
                    state.setdefault(key, torch.zeros_like(flat))
                state["step"] = torch.tensor(step, dtype=torch.float32)
        else:
            inner.state.clear()
        for name, param in self.trainable_parameters(model):
            values = {None: tensors["model"][name]}
            if "optim" in tensors:
                values.update({k: tensors["optim"]["state"][name][k] for k in _ADAM_STATE_KEYS})
            if self.stage == 3:
                self._load_partitions(param, values)
            else:
                self._load_whole(param, values)

    def _load_partitions(self, param: nn.Parameter, values: dict[str | None, DTensor]) -> None:
        """ZeRO-3: each rank's flat partition from the loaded dim-0 chunks (one all-to-all per tensor)."""
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
        from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

        size = param.ds_tensor.numel()

        def flat(value: DTensor) -> torch.Tensor:
            rows = value.to_local().to(self.device)
            return rows_to_flat(rows, _full_shape(param), size, self.rank, self.world_size)

        weight = flat(values[None])
        gathered = param.ds_status == ZeroParamStatus.AVAILABLE  # a persistent (small) parameter
        if gathered:
            param.partition()
        param.ds_tensor.data.copy_(weight.to(param.ds_tensor.dtype))
        if gathered:
            param.all_gather()
        safe_set_local_fp32_param(param, weight)
        for key in _ADAM_STATE_KEYS:
            if key in values:
                safe_set_local_optimizer_state(param, flat(values[key]), key)

    def _load_whole(self, param: nn.Parameter, values: dict[str | None, DTensor]) -> None:
        """ZeRO-2: the module holds the whole tensor on every rank; the fp32 master takes it whole too."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        weight = values[None].full_tensor().to(self.device)
        param.data.copy_(weight.to(param.dtype))
        safe_set_full_fp32_param(param, weight)
        for key in _ADAM_STATE_KEYS:
            if key in values:
                safe_set_full_optimizer_state(param, values[key].full_tensor().to(self.device), key)

    # -- lifecycle ----------------------------------------------------------------------------------------

    def close(self) -> None:
        self.engine = None
        self._hf_ds_config = None
        super().close()


def _full_shape(param: nn.Parameter) -> torch.Size:
    return param.ds_shape if hasattr(param, "ds_shape") else param.shape


def _full_numel(param: nn.Parameter) -> int:
    return param.ds_numel if hasattr(param, "ds_numel") else param.numel()


def _inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer that ZeRO drives over its flat fp32 partitions."""
    return optimizer.optimizer


def fp32_partitions(optimizer: Any) -> list[torch.Tensor]:
    """This rank's flat fp32 master partitions: what the inner Adam steps and keeps moments for.

    (ZeRO-3 puts them into the inner optimizer's param groups only for the duration of a step.)
    """
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3
        return list(optimizer.fp32_partitioned_groups_flat)
    return list(optimizer.single_partition_of_fp32_groups)  # ZeRO-1/2


def optimizer_state_numel(optimizer: Any) -> dict[str, int]:
    """Elements of this rank's fp32 partitions and of its Adam moments, measured from the ZeRO optimizer."""
    inner = _inner_optimizer(optimizer)
    moments = sum(
        t.numel() for state in inner.state.values() for k, t in state.items() if k in _ADAM_STATE_KEYS
    )
    return {"partition": sum(p.numel() for p in fp32_partitions(optimizer)), "moments": moments}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
