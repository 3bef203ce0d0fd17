"""What a continued wave trains with: the ``continual.*`` settings that stand in for ``train.*`` and
``augment.*`` once ``continual.previous`` is set, so one config file serves every wave of a chain."""

from __future__ import annotations

import dataclasses

from locft_dist.config import RunConfig


def continued_wave_config(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``continual.epochs``, ``locality_ratio`` and ``locality_weight`` in place of
    ``train.epochs``, ``augment.locality_ratio`` and ``augment.locality_weight`` on a continued wave; a first
    wave (no ``continual.previous``) is returned as it is. The run directory records the result, so a
    resumed wave compares like with like."""
    wave = cfg.continual
    if not wave.previous:
        return cfg
    train, aug = cfg.train, cfg.augment
    if wave.epochs is not None:
        train = dataclasses.replace(train, epochs=wave.epochs)
    if wave.locality_ratio is not None:
        aug = dataclasses.replace(aug, locality_ratio=wave.locality_ratio)
    if wave.locality_weight is not None:
        aug = dataclasses.replace(aug, locality_weight=wave.locality_weight)
    return dataclasses.replace(cfg, train=train, augment=aug)
