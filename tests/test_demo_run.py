"""`locft demo` end to end on the tiny world (the real demo sizes are measured in docs/demo.md)."""

import json

from locft_dist.demo.build import TINY
from locft_dist.demo.run import DemoSettings, run_demo


def test_demo_edits_with_both_editors_and_prints_them_side_by_side(tmp_path, capsys):
    settings = DemoSettings(
        num_edits=40,
        layers=(1,),
        modules=("mlp.down_proj",),
        lr=1e-2,
        batch_size=10,
        epochs=20,
        num_heldout=30,
    )
    summary = run_demo(tmp_path, world_spec=TINY, settings=settings)
    out = capsys.readouterr().out
    assert "LocFT-BF" in out and "depth-first" in out and "Reliability TF" in out
    bf, df = summary["LocFT-BF"]["edited"], summary["depth-first"]["edited"]
    assert bf["reliability_tf"] >= 0.9
    assert bf["reliability_tf"] > df["reliability_tf"] + 0.1, "breadth-first should beat depth-first"
    for name in (
        "base_model/config.json",
        "edits.jsonl",
        "heldout.txt",
        "run/delta.safetensors",
        "run_depth_first/delta.safetensors",
        "demo_metrics.json",
        "world.json",
        "locality_train.jsonl",
    ):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "demo_metrics.json").read_text())["settings"]["num_edits"] == 40
