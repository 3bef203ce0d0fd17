"""``locft eval``: the run's encoding from the delta, checks before any model pass, one or two ranks alike."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from locft_dist.delta import fingerprint_tensors, read_base_tensors, read_delta, write_delta
from locft_dist.edits import write_jsonl
from locft_dist.edits.encode import Encoding
from locft_dist.errors import DeltaError, StorageError
from locft_dist.eval.job import EncodingFlags, resolve_encoding, run_eval
from locft_dist.eval.metrics import METRIC_KEYS
from tests.conftest import REPO

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
EDITED = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def setup(world_model, tmp_path_factory):
    """A delta that moves layer 1's down_proj (recording its run's encoding and WILD budget), edit files
    of 7 edits (uneven shares over 2 ranks) and of 1 edit (rank 1 has none), and held-out text."""
    tmp = tmp_path_factory.mktemp("eval_job")
    model_dir = world_model.model_dir
    base = read_base_tensors(model_dir, [EDITED])
    torch.manual_seed(0)
    delta = {EDITED: torch.randn_like(base[EDITED]) * 0.05}
    config = json.dumps({"edits": {"target_prefix": " "}, "eval": {"max_new_tokens": 12}})
    path = write_delta(
        tmp / "delta.safetensors",
        delta,
        base_model=str(model_dir),
        base_fingerprint=fingerprint_tensors(base),
        config_json=config,
        encoding=Encoding(max_length=64),
    )
    edits = world_model.world.make_edits(7, seed=4)
    write_jsonl(edits, tmp / "edits7.jsonl")
    write_jsonl(edits[:1], tmp / "edits1.jsonl")
    (tmp / "heldout.txt").write_text("\n".join(world_model.world.heldout_texts(5, seed=2)) + "\n")
    return {"tmp": tmp, "model": model_dir, "delta": path}


def locft_eval(nproc: int, setup, edits: str, out, *extra) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "locft_dist.cli"]
    if nproc > 1:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        launcher = [*torchrun, f"--nproc_per_node={nproc}", "-m", "locft_dist.cli"]
    args = ["eval", "--model", setup["model"], "--edits", setup["tmp"] / edits, "--json", out, *extra]
    return subprocess.run(
        [*launcher, *map(str, args)], capture_output=True, text=True, env=ENV, cwd=REPO, timeout=600
    )


@pytest.mark.parametrize("edits", ["edits7.jsonl", "edits1.jsonl"])
def test_two_fsdp_ranks_report_the_one_process_metrics(setup, edits):
    results = {}
    for nproc in (1, 2):
        out = setup["tmp"] / f"{edits}.{nproc}.json"
        proc = locft_eval(
            nproc, setup, edits, out, "--delta", setup["delta"], "--heldout", setup["tmp"] / "heldout.txt"
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[nproc] = json.loads(out.read_text())
    for part in ("unedited", "edited"):
        for key in (*METRIC_KEYS, "perplexity", "edit_score_wild", "num_edits", "num_locality"):
            assert results[2][part][key] == pytest.approx(results[1][part][key], abs=1e-6), (part, key)
    assert results[1]["edited"]["perplexity"] != results[1]["unedited"]["perplexity"]  # the delta was applied


def test_the_delta_is_checked_before_any_model_pass(setup, tmp_path):
    data = read_delta(setup["delta"])
    data.metadata["locft.base_fingerprint"] = "0" * 32
    wrong = tmp_path / "wrong.safetensors"
    write_delta(wrong, data.tensors, base_model="x", base_fingerprint="0" * 32, config_json="{}")
    out = tmp_path / "m.json"
    proc = locft_eval(1, setup, "edits7.jsonl", out, "--delta", wrong)
    assert proc.returncode == 2 and "not the base this delta was made for" in proc.stderr
    assert "evaluating" not in proc.stderr.lower() and not out.exists()


def test_an_unwritable_json_destination_fails_before_evaluating(setup, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="is a file, not a directory"):
        run_eval(str(setup["model"]), str(setup["tmp"] / "edits7.jsonl"), json_out=str(blocker / "m.json"),
                 delta_path=str(setup["delta"]))  # fmt: skip


def test_the_encoding_comes_from_the_delta_and_flags_only_fill_in(setup, caplog):
    delta = read_delta(setup["delta"])
    assert resolve_encoding(delta, EncodingFlags()) == Encoding(max_length=64)
    with caplog.at_level(logging.WARNING):
        assert resolve_encoding(delta, EncodingFlags(max_length=32)) == Encoding(max_length=64)
    assert "--max-length 32 is ignored" in caplog.text
    assert resolve_encoding(None, EncodingFlags(target_prefix="", max_length=32)) == Encoding(
        target_prefix="", max_length=32
    )
    # an older delta without locft.encoding: the edits section of its recorded config
    del delta.metadata["locft.encoding"]
    delta.metadata["locft.config"] = json.dumps({"edits": {"target_prefix": "", "append_eos": True}})
    assert resolve_encoding(delta, EncodingFlags()).target_prefix == ""


def test_dtype_and_strategy_flags(setup):
    heldout = (setup["tmp"] / "heldout.txt").read_text().splitlines()
    kwargs = {"delta_path": str(setup["delta"]), "limit": 2, "max_new_tokens": 4, "heldout": heldout}
    edits = str(setup["tmp"] / "edits7.jsonl")
    bf16 = run_eval(str(setup["model"]), edits, dtype="bfloat16", **kwargs)["edited"]
    fp32 = run_eval(str(setup["model"]), edits, **kwargs)["edited"]
    assert bf16.num_edits == 2
    # computed in bfloat16: close to float32, but not bit-equal
    assert bf16.perplexity != fp32.perplexity and bf16.perplexity == pytest.approx(fp32.perplexity, rel=0.05)
    with pytest.raises(Exception, match="dtype"):
        run_eval(str(setup["model"]), edits, dtype="int8")
    with pytest.raises(Exception, match="strategy"):
        run_eval(str(setup["model"]), edits, strategy="deepspeed")
    with pytest.raises(DeltaError):
        run_eval(str(setup["model"]), edits, delta_path=str(setup["tmp"] / "missing.safetensors"))
