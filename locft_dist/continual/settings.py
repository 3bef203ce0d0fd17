"""What a continued wave trains with: the ``continual.*`` settings that stand in for ``train.*`` and
``augment.*`` once ``continual.previous`` is set, so one config file serves every wave of a chain."""

from __future__ import annotations

import dataclasses
import logging

from locft_dist.config import RunConfig

logger = logging.getLogger(__name__)


def continued_wave_config(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``continual.epochs``, ``locality_ratio`` and ``locality_weight`` in place of
    ``train.epochs``, ``augment.locality_ratio`` and ``augment.locality_weight`` on a continued wave; a first
    wave (no ``continual.previous``) is returned as it is. The run directory keeps the config as given,
    so one file is the template of every wave; the effective values follow from it."""
    wave = cfg.continual
    if not wave.previous:
        return cfg
    train, aug = cfg.train, cfg.augment
    changes = []
    if wave.epochs is not None:
        changes.append(f"train.epochs {train.epochs} -> {wave.epochs}")
        train = dataclasses.replace(train, epochs=wave.epochs)
    if wave.locality_ratio is not None:
        changes.append(f"augment.locality_ratio {aug.locality_ratio} -> {wave.locality_ratio}")
        aug = dataclasses.replace(aug, locality_ratio=wave.locality_ratio)
    if wave.locality_weight is not None:
        changes.append(f"augment.locality_weight {aug.locality_weight} -> {wave.locality_weight}")
        aug = dataclasses.replace(aug, locality_weight=wave.locality_weight)
    if changes:
        logger.info("a continued wave trains with the continual.* settings: %s", ", ".join(changes))
    return dataclasses.replace(cfg, train=train, augment=aug)
