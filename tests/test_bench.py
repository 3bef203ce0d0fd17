"""``locft bench`` at a tiny size: both loops run, agree on the final metrics, and print the table."""

import json

from locft_dist.bench import SHAPES, BenchConfig, floor_flops
from locft_dist.cli import main


def test_bench_cli_prints_the_table_and_both_loops_agree(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "--num-layers", "3", "--num-edits", "24", "--epochs", "3", "--batch-size", "8"]
    assert main([*args, "--micro-batch-tokens", "128", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    labels = ("edits/s", "tokens/s", "first epoch s", "peak memory GiB", "fraction of FLOP floor", "speedup")
    for label in labels:
        assert label in table
    report = json.loads(out.read_text())
    naive, ours = report["loops"]
    assert (naive["name"], ours["name"]) == ("naive", "locft-dist")
    assert abs(naive["final_loss"] - ours["final_loss"]) < 1e-4
    assert naive["final_accuracy"] == ours["final_accuracy"]
    assert report["first_layer"] == 2 and report["floor_seconds"] > 0 and report["peak_flops"] > 0


def test_flop_floor_counts_only_the_layers_that_must_run():
    from locft_dist.bench import build_model, synthetic_examples
    from locft_dist.locate import freeze_all_but, resolve_location

    model = build_model(BenchConfig(num_layers=4))
    examples = synthetic_examples(4, SHAPES["tiny"].vocab, 0)
    floors = []
    for layer in (3, 1):
        freeze_all_but(model, resolve_location(model, [layer], ["mlp.down_proj"]).parameter_names)
        floors.append(floor_flops(model, layer, examples, epochs=5))
    assert floors[0] < floors[1]  # a later edited layer leaves less to run every epoch


def test_bench_on_a_model_directory_with_real_edits(tmp_path, capsys, tiny_model_dir):
    from locft_dist.edits import EditRequest, write_jsonl

    edits = tmp_path / "edits.jsonl"
    prompts = ["Kesso Varn works as a", "Dorn Asket plays the", "The home city of Mira Quell is"]
    pairs = [(p, t) for p in prompts for t in ("violin", "amber")]
    write_jsonl([EditRequest(f"{p} {i}", t) for i, (p, t) in enumerate(pairs)], edits)
    out = tmp_path / "bench.json"
    args = ["bench", "--model", str(tiny_model_dir), "--edits", str(edits), "--num-edits", "5"]
    assert main([*args, "--epochs", "3", "--batch-size", "2", "--json", str(out)]) == 0
    assert str(tiny_model_dir) in capsys.readouterr().out
    report = json.loads(out.read_text())
    naive, ours = report["loops"]
    assert report["num_layers"] == 3 and report["first_layer"] == 2
    assert report["config"]["num_edits"] == 5 and ours["num_edit_passes"] == 15
    assert abs(naive["final_loss"] - ours["final_loss"]) < 1e-4 and naive["final_loss"] > 0
    assert naive["final_accuracy"] == ours["final_accuracy"]


def test_a_shape_is_built_in_its_dtype_and_the_default_dtype_is_restored():
    import torch

    from locft_dist.bench import build_model

    model = build_model(BenchConfig(num_layers=2, dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32


def test_bench_skips_invalid_records_only_when_asked(tmp_path, tiny_model_dir):
    import pytest

    from locft_dist.bench import bench_examples, build_model
    from locft_dist.edits import EditRequest, write_jsonl
    from locft_dist.errors import EditDataError

    edits = tmp_path / "edits.jsonl"
    requests = [EditRequest("Kesso Varn works as a", "baker"), EditRequest("Dorn Asket plays the", "violin")]
    write_jsonl([*requests, EditRequest("Kesso Varn works as a", "pilot")], edits)  # one prompt, two targets
    bench = BenchConfig(model_dir=str(tiny_model_dir), edits=str(edits), num_edits=3)
    model = build_model(bench)
    with pytest.raises(EditDataError, match="record 3"):
        bench_examples(bench, model)
    bench.skip_invalid = True
    assert len(bench_examples(bench, model)) == 2


def test_eval_cost_reads_the_phases_from_the_default_log_format():
    from datetime import datetime

    from benchmarks.eval_cost import phases

    started = datetime(2026, 11, 26, 23, 59, 50).timestamp()
    log = "\n".join(
        [
            "23:59:55 INFO locft_dist.eval.in_run: evaluating the unedited model on 60 edits",
            "00:00:05 INFO locft_dist.edit_job: training: breadth_first, 60 edits",  # past midnight
            "00:00:07 INFO locft_dist.edit_job: trained in 2.0s: 2 steps",
            "00:00:08 INFO locft_dist.eval.in_run: evaluating the edited model on 60 edits",
        ]
    )
    got = phases(log, started, started + 21)
    assert got == {"eval_before_s": 10.0, "startup_s": 5.0, "train_s": 2.0, "eval_after_s": 3.0}


def test_profile_bench_takes_the_bench_options_and_reports_the_profiled_epochs(capsys):
    from benchmarks.profile_bench import main as profile_main

    profile_main(
        ["--num-layers", "2", "--num-edits", "16", "--epochs", "2", "--batch-size", "8", "--rows", "3"]
    )
    out = capsys.readouterr().out
    assert out.startswith("2 profiled epochs: wall ") and "aten::mm" in out


def test_repeated_runs_start_from_the_same_weights(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "--num-layers", "3", "--num-edits", "16", "--epochs", "2", "--batch-size", "8"]
    assert main([*args, "--repeat", "2", "--no-fused-norm", "--json", str(out)]) == 0
    assert "run 2" in capsys.readouterr().out
    report = json.loads(out.read_text())
    naive, first, second = report["loops"]
    assert [loop["name"] for loop in report["loops"]] == ["naive", "locft-dist", "run 2"]
    assert report["config"]["fused_norm"] is False and report["config"]["repeats"] == 2
    assert first["final_loss"] == second["final_loss"]  # the same start, so the same end
    assert abs(first["final_loss"] - naive["final_loss"]) < 1e-4
    assert report["speedup"] == naive["seconds"] / first["seconds"]
