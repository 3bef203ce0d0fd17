"""FSDP2 invariants on 2 gloo ranks (CPU): exact sharded loading, no full copies, frozen weights untouched,
optimizer state only for the localized parameters, bfloat16 compute over float32 master shards.

One torchrun job (tests/dist_workers/fsdp_worker.py) measures everything and writes JSON; each test asserts
on one invariant. The single-process reference strategy is held to the training invariants in-process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO
from dist_workers import fsdp_worker as worker

from locft_dist.config import ModelConfig
from locft_dist.edits import write_jsonl

WORKER = Path(worker.__file__)
WORLD_SIZE = 2
NUM_EDITS = 8
TRAINABLE = ["model.layers.1.mlp.down_proj.weight"]


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun's workers (each runs in a session of its own) and the launcher."""
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout
    for pid in [*map(int, children.split()), proc.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def edits_path(world_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fsdp_edits") / "edits.jsonl"
    write_jsonl(world_model.world.make_edits(NUM_EDITS, seed=2), path)
    return path


@pytest.fixture(scope="module")
def report(world_model, edits_path, tmp_path_factory) -> dict[str, Any]:
    """Run the worker once under torchrun; its JSON plus the launcher's stderr tail for messages."""
    out = tmp_path_factory.mktemp("fsdp") / "report.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={WORLD_SIZE}",
        str(WORKER),
        str(world_model.model_dir),
        str(edits_path),
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        _kill(proc)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"fsdp worker timed out\n{stdout[-2000:]}\n{stderr[-5000:]}") from None
    tail = f"exit {proc.returncode}\n{stdout[-2000:]}\n{stderr[-5000:]}"
    assert proc.returncode == 0 and out.is_file(), tail
    data = json.loads(out.read_text())
    assert data["world_size"] == WORLD_SIZE, tail
    return {"ranks": data["ranks"], "tail": tail}


def records(report: dict[str, Any], key: str) -> list[Any]:
    """One check's record per rank; a check that raised fails here with its traceback."""
    ranks = [r[key] for r in report["ranks"]]
    for rank, record in enumerate(ranks):
        if isinstance(record, dict) and "error" in record:
            raise AssertionError(f"rank {rank}: {key} raised:\n{record['error']}\n{report['tail']}")
    return ranks


def test_sharded_loading_is_exact(report):
    for rank, r in enumerate(records(report, "loading")):
        where = f"rank {rank}: {r}"
        assert r["logits_max_abs_diff"] <= 1e-5, where
        assert r["num_params_checked"] > 0 and r["params_missing_from_checkpoint"] == [], where
        assert r["param_mismatches"] == [], where
        assert r["buffer_mismatches"] == [], where
        assert set(r["inv_freq_max_abs_diff_from_formula"]) >= {"model.rotary_emb.inv_freq"}, where
        assert all(d <= 1e-7 for d in r["inv_freq_max_abs_diff_from_formula"].values()), where


@pytest.mark.parametrize("key", ["sharding", "sharding_after_reshard", "sharding_after_training"])
def test_no_rank_holds_a_full_copy(report, key):
    ranks = records(report, key)
    total = ranks[0]["total_numel"]
    for rank, r in enumerate(ranks):
        assert r["not_dtensor"] == [] and r["wrong_local_size"] == [], f"rank {rank}: {r}"
        assert abs(r["local_numel"] - total / WORLD_SIZE) <= 0.01 * total, f"rank {rank}: {r}"
    assert sum(r["local_numel"] for r in ranks) == total, ranks


def test_only_the_root_stays_gathered_after_an_inference_forward(report):
    """Layers, the embedding and the (tied) head are units resharded after forward; the root keeps only
    the final norm gathered."""
    for rank, names in enumerate(records(report, "unsharded_after_inference_forward")):
        assert names == ["model.norm.weight"], f"rank {rank}: {names}"


def test_embedding_and_head_units_and_the_cached_path(report):
    for rank, r in enumerate(records(report, "units")):
        where = f"rank {rank}: {r}"
        assert r["embed_is_unit"] and r["head_shares_the_unit"], where  # tied: one unit for both
        assert r["units"] == {"embed": True, "head": True}, where
        # the cached passes start from layer 1's input: the embedding is never all-gathered; the head is
        # gathered for each forward and again for each backward (it is resharded after forward)
        assert r["gathers"] == {"embed": 0, "head": 4}, where
        assert r["unsharded_after_cached_passes"] == [], where  # backward resharded the root too
        expected = ["model.layers.1.mlp.down_proj.weight"] if rank == 0 else []
        assert r["gathered_names"] == expected and r["gathered_equal_full"], where


def assert_training_invariants(r: dict[str, Any], world_size: int, num_steps: int) -> None:
    """Frozen weights bitwise unchanged; grads and Adam moments exist for the localized parameters only."""
    assert r["num_steps"] == num_steps, r
    assert r["num_frozen"] > 0 and r["frozen_changed"] == [], r
    assert r["trainable_names"] == TRAINABLE, r
    assert all(change > 0 for change in r["trainable_max_abs_change"].values()), r
    assert r["optimizer_state_names"] == r["optimizer_group_names"] == TRAINABLE, r
    assert r["optimizer_state_keys"] == ["exp_avg", "exp_avg_sq", "step"], r
    assert r["frozen_with_grad"] == [] and r["trainable_without_grad"] == [], r
    assert r["trainable_bytes"] * world_size == r["trainable_full_bytes"], r
    assert r["grad_bytes"] == r["trainable_bytes"], r
    assert r["moment_bytes"] == 2 * r["trainable_bytes"], r
    assert 0 < r["step_bytes"] <= 8 * len(TRAINABLE), r
    assert r["optimizer_bytes"] == r["moment_bytes"] + r["step_bytes"], r
    assert r["frozen_bytes"] > 0, r


def test_frozen_parameters_are_bit_identical_after_training(report):
    for rank, r in enumerate(records(report, "training")):
        assert r["num_frozen"] > 0 and r["frozen_changed"] == [], f"rank {rank}: {r}"
        assert r["trainable_max_abs_change"].keys() == set(TRAINABLE), f"rank {rank}: {r}"
        assert all(c > 0 for c in r["trainable_max_abs_change"].values()), f"rank {rank}: {r}"


def test_optimizer_state_only_for_localized_parameters(report):
    ranks = records(report, "training")
    for r in ranks:
        assert_training_invariants(r, WORLD_SIZE, num_steps=4)
    assert ranks[0]["trainable_max_abs_change"] == ranks[1]["trainable_max_abs_change"], ranks


def test_bfloat16_compute_keeps_float32_master_shards(report):
    for rank, r in enumerate(records(report, "mixed_precision")):
        where = f"rank {rank}: {r}"
        assert r["logits_dtype"] == "torch.bfloat16", where
        assert 0 < r["logits_max_abs_diff"] <= 0.05 * r["logit_scale"], where
        assert r["trainable_local_dtypes_before"] == r["trainable_local_dtypes"] == ["torch.float32"], where
        assert r["grad_local_dtypes"] == ["torch.float32"], where
        assert r["num_steps"] == 2 and r["frozen_changed"] == [], where
        assert all(c > 0 for c in r["trainable_max_abs_change"].values()), where


def test_single_process_training_invariants(world_model, edits_path):
    """The reference strategy holds the same invariants (whole tensors, world size 1)."""
    from locft_dist.parallel.single import SingleProcess

    strategy = SingleProcess("cpu")
    model, _ = strategy.load_model(ModelConfig(path=str(world_model.model_dir)), worker.LOCATE)
    examples, pad_id = worker.load_examples(str(world_model.model_dir), str(edits_path))
    record = worker.check_training(model, strategy, examples, pad_id)
    assert_training_invariants(record, world_size=1, num_steps=4)
    assert record["trainable_local_dtypes"] == ["torch.float32"], record
