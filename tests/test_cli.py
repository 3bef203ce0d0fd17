"""End to end through the `locft` command on a tiny pretrained world model."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from locft_dist.cli import main
from locft_dist.edits import load_edits, write_jsonl
from locft_dist.eval import compute_reference, evaluate_edits
from tests.conftest import REPO, shared_data

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}


def locft(*args, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "locft_dist.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=REPO,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"locft {args[0]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def close(
    a: dict,
    b: dict,
    keys=(
        "reliability_tf",
        "generalization_tf",
        "locality_tf",
        "reliability_em",
        "generalization_em",
        "locality_em",
        "perplexity",
    ),
):
    for key in keys:
        assert a[key] == pytest.approx(b[key], abs=1e-6), key


@pytest.fixture(scope="module")
def edited_run(world_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    edits = tmp / "edits.jsonl"
    write_jsonl(world_model.world.make_edits(40, seed=1), edits)
    heldout = tmp / "heldout.txt"
    heldout.write_text("\n".join(world_model.world.heldout_texts(30, seed=1)) + "\n")
    args = [
        f"model.path={world_model.model_dir}",
        f"edits.path={edits}",
        "locate.layers=[1]",
        "train.lr=5e-3",
        "train.batch_size=10",
        "train.epochs=12",
        f"eval.heldout_path={heldout}",
        f"output.dir={tmp / 'run'}",
        "train.progress=false",
    ]
    proc = locft("edit", *args)
    return {
        "dir": tmp / "run",
        "edits": edits,
        "heldout": heldout,
        "args": args,
        "stdout": proc.stdout,
        "model": world_model.model_dir,
    }


def test_edit_writes_the_run_directory_contract(edited_run):
    run = edited_run["dir"]
    for name in ("config.yaml", "delta.safetensors", "metrics.json", "log.jsonl"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["edited"]["reliability_tf"] > metrics["unedited"]["reliability_tf"] + 0.3
    assert metrics["edited"]["num_edits"] == 40
    events = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert {"setup", "step", "epoch", "eval", "done"} <= {e["event"] for e in events}
    assert set(load_file(str(run / "delta.safetensors"))) == {"model.layers.1.mlp.down_proj.weight"}
    assert "Reliability" in edited_run["stdout"]


def test_eval_of_the_delta_reproduces_the_run_metrics(edited_run, tmp_path):
    out = tmp_path / "eval.json"
    locft(
        "eval",
        "--model",
        edited_run["model"],
        "--edits",
        edited_run["edits"],
        "--delta",
        edited_run["dir"] / "delta.safetensors",
        "--heldout",
        edited_run["heldout"],
        "--json",
        out,
    )
    reported = json.loads(out.read_text())
    in_run = json.loads((edited_run["dir"] / "metrics.json").read_text())
    close(reported["edited"], in_run["edited"])
    close(
        reported["unedited"], in_run["unedited"], keys=("reliability_tf", "generalization_tf", "perplexity")
    )


def test_plain_transformers_plus_delta_reproduces_the_metrics(edited_run):
    """A user who never installs locft: load the base, add the delta tensors, evaluate."""
    model_dir = edited_run["model"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    requests = load_edits(edited_run["edits"]).requests
    reference = compute_reference(model, tokenizer, requests)
    delta = load_file(str(edited_run["dir"] / "delta.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in delta.items():
            params[name].add_(value)
    heldout = edited_run["heldout"].read_text().splitlines()
    metrics = evaluate_edits(model, tokenizer, requests, reference, heldout_texts=heldout).to_dict()
    close(metrics, json.loads((edited_run["dir"] / "metrics.json").read_text())["edited"])


def test_apply_writes_a_model_with_the_same_metrics(edited_run, tmp_path):
    locft(
        "apply",
        "--model",
        edited_run["model"],
        "--delta",
        edited_run["dir"] / "delta.safetensors",
        "--out",
        tmp_path / "edited",
    )
    out = tmp_path / "eval.json"
    locft(
        "eval",
        "--model",
        tmp_path / "edited",
        "--edits",
        edited_run["edits"],
        "--json",
        out,
        "--no-generation",
    )
    reported = json.loads(out.read_text())  # the applied model is the edited one; its base is still there
    in_run = json.loads((edited_run["dir"] / "metrics.json").read_text())
    close(reported["edited"], in_run["edited"], keys=("reliability_tf", "generalization_tf", "locality_tf"))
    close(
        reported["unedited"], in_run["unedited"], keys=("reliability_tf", "generalization_tf", "locality_tf")
    )
    assert reported["edited"]["edit_score_tf"] == pytest.approx(in_run["edited"]["edit_score_tf"], abs=1e-6)


def test_eval_without_a_delta_scores_the_base_as_edit_does(edited_run, tmp_path):
    """Locality of the unedited model against itself is 1.0 and its edit score has three parts."""
    out = tmp_path / "base.json"
    locft("eval", "--model", edited_run["model"], "--edits", edited_run["edits"], "--json", out)
    reported = json.loads(out.read_text())
    assert set(reported) == {"unedited"}
    in_run = json.loads((edited_run["dir"] / "metrics.json").read_text())["unedited"]
    assert reported["unedited"]["locality_tf"] == 1.0 and reported["unedited"]["locality_em"] == 1.0
    close(
        reported["unedited"], in_run, keys=("reliability_tf", "locality_tf", "edit_score_tf", "edit_score_em")
    )


def test_rerun_is_a_no_op_and_a_changed_config_is_refused(edited_run):
    before = (edited_run["dir"] / "delta.safetensors").stat().st_mtime_ns
    locft("edit", *edited_run["args"])
    assert (edited_run["dir"] / "delta.safetensors").stat().st_mtime_ns == before
    proc = locft("edit", *edited_run["args"], "train.lr=1e-3", check=False)
    assert proc.returncode == 2
    assert "train.lr: 0.005 in the run, 0.001 now" in proc.stderr, proc.stderr
    assert f"locft edit --config {edited_run['dir'] / 'config.yaml'}" in proc.stderr  # keeps the checkpoints


def test_user_errors_exit_2_with_a_message(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "target_new": "b"}\n{"prompt": "c", "target_new": 3}\n')
    assert (
        main(["edit", f"model.path={tiny_model_dir}", f"edits.path={bad}", f"output.dir={tmp_path}/r"]) == 2
    )
    proc = locft("edit", "train.lrr=1", f"output.dir={tmp_path}/r4", check=False)
    assert proc.returncode == 2 and "did you mean 'train.lr'" in proc.stderr
    proc = locft(
        "edit", f"model.path={tiny_model_dir}", f"edits.path={bad}", f"output.dir={tmp_path}/r2", check=False
    )
    assert proc.returncode == 2 and "bad.jsonl: record 2: field 'target_new'" in proc.stderr
    proc = locft("edit", f"model.path={tmp_path}/nowhere", f"output.dir={tmp_path}/r3", check=False)
    assert proc.returncode == 2 and "not a local Hugging Face model directory" in proc.stderr


def test_a_refusal_is_recorded_for_the_slurm_script(tmp_path, monkeypatch):
    """Exit 2 writes its message to LOCFT_FATAL_FILE, so the sbatch script does not requeue a hopeless run."""
    fatal = tmp_path / "job.fatal"
    monkeypatch.setenv("LOCFT_FATAL_FILE", str(fatal))
    assert main(["edit", f"model.path={tmp_path}/nowhere", f"output.dir={tmp_path}/r"]) == 2
    assert "nowhere" in fatal.read_text() and "error" in fatal.read_text()
    monkeypatch.delenv("LOCFT_FATAL_FILE")
    fatal.unlink()
    assert main(["edit", f"model.path={tmp_path}/nowhere", f"output.dir={tmp_path}/r"]) == 2
    assert not fatal.exists()


def test_wrong_location_is_a_clear_error(tmp_path, tiny_model_dir):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "Kesso Varn works as a", "target_new": "glassblower"}\n')
    proc = locft(
        "edit",
        f"model.path={tiny_model_dir}",
        f"edits.path={good}",
        "locate.layers=[7]",
        f"output.dir={tmp_path}/r",
        check=False,
    )
    assert proc.returncode == 2 and "7" in proc.stderr and "3" in proc.stderr


def test_convert_and_help(tmp_path):
    out = tmp_path / "zsre.jsonl"
    proc = locft("convert", shared_data("zsre_3k.json"), out, "--limit", "25")
    assert "wrote 25 edits (zsre" in proc.stdout
    assert len(load_edits(out).requests) == 25
    for command in ("edit", "eval", "apply", "convert", "demo", "import-gguf"):
        assert "examples:" in locft(command, "--help").stdout
    assert "train.lr" in locft("edit", "--help-config").stdout
