"""The ablation command's rows: each is a valid `locft edit` config, changing one thing at a time."""

from pathlib import Path

from locft_dist.config import load_config
from locft_dist.demo.ablation import ablation_rows, format_table
from locft_dist.demo.run import QUICK


def test_rows_are_valid_configs_changing_one_thing_at_a_time(tmp_path):
    rows = ablation_rows(QUICK, tmp_path / "loc.jsonl", paraphrases=2)
    configs = [load_config(None, [f"model.path={tmp_path}", *overrides]) for overrides in rows.values()]
    assert [c.train.pipeline for c in configs] == ["depth_first"] + ["breadth_first"] * 4
    assert [c.train.batch_size for c in configs[1:]] == [1] + [QUICK.batch_size] * 3
    assert [c.locate.layers for c in configs] == [[-1]] * 3 + [list(QUICK.layers)] * 2
    assert configs[3].augment.locality_source == "none"
    assert configs[4].augment.locality_source == "file" and configs[4].augment.paraphrases == 2
    assert Path(configs[4].augment.locality_path) == tmp_path / "loc.jsonl"


def test_table_has_a_row_per_step():
    metrics = {"reliability_tf": 1.0, "generalization_tf": 0.5, "locality_tf": 0.25, "edit_score_tf": 0.4}
    table = format_table({"a": {"edited": metrics, "train": {"seconds": 3.0}}})
    assert table.splitlines()[-1] == "| a | 1.000 | 0.500 | 0.250 | 0.400 | 3 |"
