"""Flat ZeRO-3 partitions <-> FSDP2 dim-0 chunks, and gathering to rank 0, on 3 gloo ranks."""

import json

import pytest
import torch.multiprocessing as mp
from dist_workers import reshard_worker as worker

from tests.conftest import free_port


@pytest.mark.parametrize("world_size", [3])  # uneven chunks, padding, a rank with no rows
def test_layouts_round_trip_without_a_whole_copy(tmp_path, monkeypatch, world_size):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.spawn(worker.run, args=(world_size, free_port(), str(tmp_path)), nprocs=world_size, join=True)
    for rank in range(world_size):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [], rank
