"""Joining the job's process group and the few collectives the trainer needs, shared by FSDP and DeepSpeed."""

from __future__ import annotations

import os
import re
from collections.abc import MutableMapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def adopt_slurm_env(env: MutableMapping[str, str] = os.environ) -> None:
    """Under ``srun --ntasks N locft edit ...`` (no torchrun), set the env:// variables from SLURM's.

    Only for a step with several tasks whose launcher set no ``WORLD_SIZE``: the rendezvous is the step's
    first node, on a port derived from the job and step ids (``MASTER_PORT``/``MASTER_ADDR`` win if set).
    """
    tasks = env.get("SLURM_STEP_NUM_TASKS") or ""
    if "WORLD_SIZE" in env or "SLURM_PROCID" not in env or not tasks.isdigit() or int(tasks) < 2:
        return
    job, step = int(env.get("SLURM_JOB_ID", "0")), int(env.get("SLURM_STEP_ID", "0") or 0)
    env["WORLD_SIZE"] = tasks
    env["RANK"] = env["SLURM_PROCID"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env.setdefault("MASTER_ADDR", first_host(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]))
    env.setdefault("MASTER_PORT", str(20000 + (job * 7 + step) % 20000))


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list (``node[003-010,12],gpu7`` -> ``node003``)."""
    first = re.match(r"[^,\[]*(\[[^\]]*\])?", nodelist.strip()).group(0)
    prefix, _, ranges = first.partition("[")
    return prefix + re.split(r"[-,\]]", ranges)[0] if ranges else prefix


def init_process_group(device_spec: str, timeout_minutes: float) -> tuple[int, int, torch.device]:
    """Join the job started by torchrun/srun/deepspeed (env:// rendezvous): NCCL on GPU, gloo on CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_spec != "cpu"
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=timedelta(minutes=timeout_minutes),
            device_id=device if use_cuda else None,
        )
    return dist.get_rank(), dist.get_world_size(), device


class ProcessGroupCollectives:
    """Strategy methods that need only the default process group (the owner sets ``rank``, ``device``)."""

    rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
