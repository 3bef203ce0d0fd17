"""`locft locate`: candidates trained from the base on a sample, ranked, and a preset `locft edit` accepts."""

import logging

import pytest

from locft_dist.cli import main
from locft_dist.config import load_config
from locft_dist.edits import EditRequest, LocalityProbe, write_jsonl
from locft_dist.errors import ConfigError
from locft_dist.locate_search import sample_edits, search

EDITS = [
    ("Vorin Talbeck lives in the city of", "Baltholm", "The home city of Vorin Talbeck is"),
    ("Kesso Varn works as a", "cartographer", "The profession of Kesso Varn is"),
    ("Dorn Asket plays the", "amber", "The favourite colour of Rina Sol is"),
    ("Mira Quell lives in the city of", "Ostrava", "The home city of Mira Quell is"),
]


@pytest.fixture
def edits_file(tmp_path):
    path = tmp_path / "edits.jsonl"
    probe = LocalityProbe("Ulla Pemberton works as a", "cartographer")
    write_jsonl(
        [EditRequest(p, a, rephrase_prompts=(r,), locality_prompts=(probe,)) for p, a, r in EDITS], path
    )
    return path


def _cfg(tiny_model_dir, edits_file, *extra):
    return [
        f"model.path={tiny_model_dir}",
        f"edits.path={edits_file}",
        "model.device=cpu",
        "train.lr=1e-2",
        "train.batch_size=2",
        *extra,
    ]


def test_candidates_start_from_the_base_whatever_the_order(tiny_model_dir, edits_file):
    cfg = load_config(None, _cfg(tiny_model_dir, edits_file))
    forward = search(cfg, [0, 2], ["mlp.down_proj"], num_sample=3, epochs=2)
    backward = search(cfg, [2, 0], ["mlp.down_proj"], num_sample=3, epochs=2)
    scores = {c.layer: c.metrics.to_dict() for c in forward}
    assert scores == {c.layer: c.metrics.to_dict() for c in backward}, "a candidate saw another's weights"
    assert [c.score for c in forward] == sorted((c.score for c in forward), reverse=True)


def test_without_epochs_candidates_train_the_runs_epochs_and_say_so(tiny_model_dir, edits_file, caplog):
    cfg = load_config(None, _cfg(tiny_model_dir, edits_file, "train.epochs=2"))
    with caplog.at_level(logging.INFO, logger="locft_dist.locate_search"):
        (candidate,) = search(cfg, [1], ["mlp.down_proj"], num_sample=2, epochs=None)
    assert "1 candidates, 2 of 4 edits, 2 epochs each" in caplog.text, caplog.text
    assert candidate.metrics is not None


def test_cli_writes_a_preset_that_edit_accepts(tiny_model_dir, edits_file, tmp_path, capsys):
    out = tmp_path / "preset.yaml"
    args = ["locate", "--layers", "1", "--modules", "mlp.down_proj", "mlp.up_proj", "--sample", "2"]
    code = main([*args, "--epochs", "1", "--out", str(out), *_cfg(tiny_model_dir, edits_file)])
    assert code == 0
    table = capsys.readouterr().out
    assert "mlp.up_proj" in table and "mlp.down_proj" in table
    preset = load_config(out)
    assert preset.locate.layers == [1] and preset.locate.modules[0] in ("mlp.down_proj", "mlp.up_proj")


def test_edits_without_probes_are_refused(tiny_model_dir, tmp_path):
    path = tmp_path / "bare.jsonl"
    write_jsonl([EditRequest(p, a) for p, a, _ in EDITS], path)
    with pytest.raises(ConfigError, match="rephrase and locality"):
        search(load_config(None, _cfg(tiny_model_dir, path)), [0], ["mlp.down_proj"], num_sample=2, epochs=1)


def test_sample_is_seeded():
    assert sample_edits(list(range(10)), 4, seed=1) == sample_edits(list(range(10)), 4, seed=1)
    assert sample_edits(list(range(3)), 4, seed=1) == [0, 1, 2]
