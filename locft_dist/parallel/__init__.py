"""Strategies: the only code that knows about ranks. ``make_strategy`` picks one from the config."""

from __future__ import annotations

import os

from locft_dist.config import RunConfig
from locft_dist.errors import ConfigError
from locft_dist.parallel.base import Strategy
from locft_dist.parallel.process_group import adopt_slurm_env


def world_size_from_env() -> int:
    """The job's size as its launcher set it (torchrun, deepspeed, accelerate, or srun's own variables)."""
    adopt_slurm_env()
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_strategy(cfg: RunConfig) -> Strategy:
    """``auto``: one process -> single, several (torchrun/srun/deepspeed set WORLD_SIZE) -> fsdp."""
    world_size = world_size_from_env()
    name = cfg.dist.strategy
    if name == "auto":
        name = "none" if world_size == 1 else "fsdp"
    if cfg.train.compile and name != "none":
        raise ConfigError(f"train.compile runs in one process; this job has {world_size} ranks ({name})")
    if name == "none":
        if world_size != 1:
            raise ConfigError(f"dist.strategy=none but WORLD_SIZE={world_size}: use fsdp or deepspeed")
        from locft_dist.parallel.single import SingleProcess

        return SingleProcess(cfg.model.device)
    if name == "fsdp":
        from locft_dist.parallel.fsdp import FSDPStrategy

        return FSDPStrategy(cfg.dist, cfg.model.device)
    if name == "deepspeed":
        try:
            from locft_dist.parallel.deepspeed import DeepSpeedStrategy
        except ImportError as err:
            raise ConfigError(
                f"dist.strategy=deepspeed needs DeepSpeed: pip install 'locft-dist[deepspeed]' ({err})"
            ) from None
        return DeepSpeedStrategy(cfg)
    raise ConfigError(f"dist.strategy={name} is unknown (use auto, none, fsdp or deepspeed)")
