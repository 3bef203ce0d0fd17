"""Saves checkpoints back to back until killed: ``python save_loop.py RUN_DIR``.

Step N's weights are all N, so whatever checkpoint survives a kill can be checked for being whole. Most of
the loop's time is spent inside ``CheckpointManager.save``, so a kill at a random moment lands mid-save.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from locft_dist.checkpoint import CheckpointManager, TrainState

SAMPLER = {"consumed": 0, "seed": 0, "global_batch_size": 2, "num_edits": 10, "dataset_fingerprint": "fp"}


def make() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Linear(512, 1024)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def main(run_dir: str) -> None:
    model, optimizer = make()
    model(torch.ones(1, 512)).sum().backward()
    optimizer.step()  # so the optimizer state (Adam moments) is saved too
    manager = CheckpointManager(Path(run_dir), keep_last=2, rank=0, world_size=1, barrier=lambda: None)
    latest = manager.latest_valid()
    step = 0 if latest is None else manager.load(latest, model, optimizer).step
    while True:
        step += 1
        with torch.no_grad():
            for param in model.parameters():
                param.fill_(step)
        manager.save(step, model, optimizer, TrainState(step=step, sampler=SAMPLER))


if __name__ == "__main__":
    main(sys.argv[1])
