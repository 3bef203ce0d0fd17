"""Worker for tests/test_reshard.py: the layout moves on W gloo ranks, checked against the whole tensor.

Importable by processes started with ``torch.multiprocessing.spawn`` (spawn passes ``sys.path`` on).
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from locft_dist.parallel.reshard import flat_to_rows, gather_rows, local_rows, rows_to_flat

SHAPES = [(7, 5), (8, 4), (3, 2), (1, 9), (10,), (2, 3, 4)]
"""Uneven and even row counts, fewer rows than ranks, 1-D and 3-D tensors."""


def run(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    failures = []
    for shape in map(torch.Size, SHAPES):
        whole = torch.arange(shape.numel(), dtype=torch.float32).view(shape) + 1
        partition = -(-shape.numel() // world_size)
        padded = torch.zeros(partition * world_size)
        padded[: shape.numel()] = whole.reshape(-1)
        flat = padded[rank * partition : (rank + 1) * partition].clone()  # ZeRO-3's partition of this rank
        rows = flat_to_rows(flat, shape, rank, world_size)
        if not torch.equal(rows, local_rows(whole, rank, world_size)):
            failures.append(f"flat_to_rows {tuple(shape)}")
        if not torch.equal(rows_to_flat(rows, shape, partition, rank, world_size), flat):
            failures.append(f"rows_to_flat {tuple(shape)}")
        gathered = gather_rows(rows, shape[0], rank, world_size)
        if (gathered is None) != (rank != 0) or (gathered is not None and not torch.equal(gathered, whole)):
            failures.append(f"gather_rows {tuple(shape)}")
    Path(out, f"rank{rank}.json").write_text(json.dumps(failures))
    dist.destroy_process_group()
