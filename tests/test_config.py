import pytest

from locft_dist.config import RunConfig, all_keys, describe_keys, load_config
from locft_dist.errors import ConfigError
from locft_dist.locate import PRESETS


def test_defaults_match_the_authors_reference_settings():
    cfg = load_config()
    assert cfg.train.pipeline == "breadth_first"
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.epochs) == (5e-4, 100, 25)
    assert cfg.train.early_stop_loss == 0.01
    assert cfg.locate.modules == ["mlp.down_proj"]


def test_yaml_then_overrides_later_wins(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 1.0e-3\n  epochs: 3\nlocate:\n  layers: [2]\n")
    cfg = load_config(path, ["train.lr=5e-4", "locate.layers=[-1, 0]", "eval.limit=null"])
    assert cfg.train.lr == 5e-4  # YAML 1.1 reads 5e-4 as a string; it is coerced to a float
    assert cfg.train.epochs == 3
    assert cfg.locate.layers == [-1, 0]
    assert cfg.eval.limit is None


def test_unknown_key_suggests_the_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"'train\.lrr'.*did you mean 'train\.lr'"):
        load_config(None, ["train.lrr=1"])
    path = tmp_path / "bad.yaml"
    path.write_text("trian:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'trian\.epochs'.*did you mean 'train\.epochs'"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=two", r"'train\.epochs' must be an integer"),
        ("train.epochs=0", r"'train\.epochs' must be positive"),
        ("train.pipeline=sideways", r"'train\.pipeline' must be one of breadth_first, depth_first"),
        ("train.progress=maybe", r"'train\.progress' must be true or false"),
        ("locate.layers=[]", r"'locate\.layers' must name at least one layer"),
        ("train.lr", r"must look like key=value"),
        ("train.betas=[0.9]", r"'train\.betas' must be two numbers"),
        ("train.focus_epochs=-1", r"'train\.focus_epochs' must be >= 0"),
        ("train.focus_loss=0", r"'train\.focus_loss' must be positive"),
        ("locate.common_generated_tokens=-2", r"'locate\.common_generated_tokens' must be >= 0"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_preset_applies_under_explicit_keys():
    cfg = load_config(None, ["locate.preset=mistral-7b"])
    assert cfg.locate.layers == [23] and cfg.locate.modules == ["*"] and cfg.train.lr == 5e-5
    cfg = load_config(None, ["locate.preset=llama3-8b", "train.lr=1e-3"])
    assert cfg.locate.layers == [22] and cfg.train.lr == 1e-3


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(Exception, match="llama3-8b"):
        load_config(None, ["locate.preset=llama3-8"])


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["train.lr=2e-4", "locate.layers=[1, 3]"])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


def test_every_key_is_documented():
    text = describe_keys()
    for key in all_keys():
        assert key in text
    assert "Adam betas" in text
    assert isinstance(RunConfig().to_json(), str)


def test_config_reference_doc_is_current():
    from tests.conftest import REPO

    doc = (REPO / "docs" / "config.md").read_text()
    assert describe_keys() in doc, "docs/config.md is stale: regenerate it from `locft edit --help-config`"


def test_smollm2_subjects_preset_needs_common_text_and_wordings(tmp_path):
    common, pool = tmp_path / "common.jsonl", tmp_path / "counterfact.jsonl"
    with pytest.raises(ConfigError, match=r"augment\.wordings_path"):
        load_config(None, ["locate.preset=smollm2-135m-subjects", f"locate.common_text_path={common}"])
    with pytest.raises(ConfigError, match=r"locate\.common_text_path"):
        load_config(None, ["locate.preset=smollm2-135m-subjects", f"augment.wordings_path={pool}"])
    preset = "locate.preset=smollm2-135m-subjects"
    cfg = load_config(None, [preset, f"augment.locality_path={common}", f"augment.wordings_path={pool}"])
    assert cfg.locate.subject_embeddings and cfg.augment.wordings == 2 and cfg.train.lr == 0.1
    assert cfg.augment.locality_source == "none"  # the locality file serves as common text only
    assert not cfg.locate.tune_sequence_start  # the first position keeps its row (docs/editing_quality.md)
    explicit = [preset, f"augment.locality_path={common}", f"augment.wordings_path={pool}"]
    assert load_config(None, [*explicit, "locate.tune_sequence_start=true"]).locate.tune_sequence_start


def test_smollm2_preset_needs_a_locality_file(tmp_path):
    with pytest.raises(ConfigError, match=r"preset 'smollm2-135m'.*augment\.locality_path"):
        load_config(None, ["locate.preset=smollm2-135m"])
    pool = tmp_path / "locality.jsonl"
    cfg = load_config(None, ["locate.preset=smollm2-135m", f"augment.locality_path={pool}"])
    assert cfg.augment.locality_source == "file" and cfg.augment.locality_path == str(pool)
    assert cfg.locate.layers == PRESETS["smollm2-135m"]["locate.layers"]
    assert cfg.train.lr == PRESETS["smollm2-135m"]["train.lr"]
    cfg = load_config(None, ["locate.preset=smollm2-135m", "augment.locality_source=none"])
    assert cfg.augment.locality_source == "none" and cfg.augment.locality_path is None
