"""100K edits through torchrun (2 ranks, FSDP2): one full epoch, flat host memory, edits/s reported.

Host memory must scale with the model, not the edit count: the 100K run's peak stays within 2x of a 10K
run's (the token cache keeps the ids as flat arrays, not 100K Python tuples). What scales here is the
edit count, so the model is the test world's tokenizer under a narrow, randomly initialized 2-layer Llama:
the per-edit work (reading, tokenizing, caching, sampling, batching, the step loop) is what is measured,
not matrix products.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from locft_dist.demo.synthetic import synthetic_edits
from locft_dist.edits import write_jsonl
from tests.conftest import make_random_llama
from tests.test_distributed import ENV, REPO

NUM_EDITS = 100_000


@pytest.fixture(scope="module")
def narrow_model_dir(world_model, tmp_path_factory) -> Path:
    """The world's tokenizer under a 2-layer, 32-wide Llama (random weights)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(world_model.model_dir)
    model = make_random_llama(len(tokenizer), num_layers=2, hidden=32)
    out = tmp_path_factory.mktemp("narrow")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _run(model_dir: Path, tmp_path, num_edits: int) -> tuple[subprocess.CompletedProcess, list[dict]]:
    edits = tmp_path / f"edits{num_edits}.jsonl"
    assert write_jsonl(synthetic_edits(num_edits, seed=0), edits) == num_edits
    run_dir = tmp_path / f"run{num_edits}"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "locft_dist.cli",
            "edit",
            f"model.path={model_dir}",
            f"edits.path={edits}",
            "locate.layers=[1]",
            "train.batch_size=1000",
            "train.epochs=1",
            "eval.enabled=false",
            "train.progress=false",
            f"output.dir={run_dir}",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=REPO,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (run_dir / "delta.safetensors").is_file()
    return proc, [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_100k_edits_one_epoch_on_two_ranks(narrow_model_dir, tmp_path):
    _, small = _run(narrow_model_dir, tmp_path, NUM_EDITS // 10)
    proc, events = _run(narrow_model_dir, tmp_path, NUM_EDITS)
    steps = [e for e in events if e["event"] == "step"]
    assert len(steps) == NUM_EDITS // 1000 and sum(e["batch_edits"] for e in steps) == NUM_EDITS
    peaks = [e["peak_host_gib"] for e in events if e["event"] == "peak_memory"]
    assert len(peaks) == 2  # after the first step, at the end of the epoch
    assert peaks[-1] <= 1.3 * peaks[0], f"host memory grew during the epoch: {peaks}"
    small_peak = [e["peak_host_gib"] for e in small if e["event"] == "peak_memory"][-1]
    assert peaks[-1] <= 2 * small_peak, f"100K edits peak {peaks[-1]:.2f} GiB vs 10K {small_peak:.2f} GiB"
    assert "edits/s" in proc.stderr
    rate = float(proc.stderr.split(" edits/s")[0].rsplit(",", 1)[1])
    print(
        f"100K edits, 2 ranks: {rate:.0f} edits/s, peak host {peaks[-1]:.2f} GiB per rank "
        f"(10K edits: {small_peak:.2f} GiB)"
    )
