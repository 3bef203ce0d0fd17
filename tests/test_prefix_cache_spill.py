"""Prefix-cache row storage: host slabs up to the host budget, then a spill file; training is unchanged."""

import logging

import pytest
import torch

from locft_dist.parallel.single import SingleProcess
from locft_dist.prefix_cache import RowStore
from locft_dist.trainer import train_breadth_first
from tests.test_trainer import cfg, examples_for, setup


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_come_back_unchanged_from_slabs_and_the_spill_file(tmp_path, dtype):
    rows = {i: torch.randn(3 + i % 5, 8).to(dtype) for i in range(40)}
    itemsize = rows[0].element_size()
    budget = sum(r.numel() for i, r in rows.items() if i < 10) * itemsize
    store = RowStore(torch.device("cpu"), None, budget, str(tmp_path))
    for i, row in rows.items():
        store.put(i, row)
    store.seal()
    assert len(store) == 40
    assert store.host_bytes == budget and store.device_bytes == 0
    assert store.spill_bytes == sum(r.numel() for i, r in rows.items() if i >= 10) * itemsize
    assert not list(tmp_path.iterdir()), "the spill file is unlinked at once"
    for i in reversed(range(40)):  # any order, any number of times
        assert torch.equal(store.get(i), rows[i]) and store.get(i).dtype == dtype


def test_training_from_spilled_rows_equals_training_from_memory(tiny_tokenizer, tmp_path, caplog):
    examples = examples_for(tiny_tokenizer, n=10)
    deltas = {}
    for host_gib in (None, 0.0):
        model, trainable = setup(tiny_tokenizer, layers=(-1,))
        before = {n: p.detach().clone() for n, p in trainable}
        train_cfg = cfg(epochs=3, prefix_cache=True)
        train_cfg.prefix_cache_host_gib = host_gib
        train_cfg.prefix_cache_spill_dir = str(tmp_path)
        with caplog.at_level(logging.INFO):
            train_breadth_first(model, examples, SingleProcess("cpu"), train_cfg, pad_id=0)
        deltas[host_gib] = {n: p.detach() - before[n] for n, p in trainable}
    assert "0.0 MiB in host memory" in caplog.text and "spilling further rows" in caplog.text
    for name, delta in deltas[None].items():
        assert delta.abs().max() > 1e-4
        assert torch.equal(deltas[0.0][name], delta), "spilled rows must train bitwise the same"
