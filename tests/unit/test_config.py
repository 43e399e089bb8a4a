"""Config merging and validation: defaults <- YAML <- overrides, typed and checked at start-up."""

from pathlib import Path

import pytest

from emotr.config import (
    MAX_HEAD_LAYERS,
    CategoricalSpace,
    Config,
    ConfigError,
    FloatSpace,
    HeadParams,
    IntSpace,
)
from emotr.config_io import DEFAULT_CONFIG, load_config, to_flat_dict, to_yaml

CONF = DEFAULT_CONFIG.parent


def test_default_yaml_documents_exactly_the_schema_defaults():
    assert load_config([DEFAULT_CONFIG]) == Config()


@pytest.mark.parametrize("name", ["default", "demo", "smoke", "cluster"])
def test_every_shipped_config_is_valid(name):
    load_config([CONF / f"{name}.yaml"])


def test_yaml_then_overrides_take_precedence():
    cfg = load_config(
        [CONF / "demo.yaml"],
        ["tune.n_trials=7", "backbone.input_size=[400, 500]", "ray.address=auto"],
    )
    assert cfg.tune.n_trials == 7
    assert cfg.backbone.input_size == (400, 500)
    assert cfg.backbone.weights == "hed-bsds500"  # from demo.yaml
    assert cfg.tune.concurrency == Config().tune.concurrency  # untouched default
    assert cfg.ray.address == "auto"


def test_later_files_override_earlier_ones(tmp_path: Path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("tune:\n  n_trials: 3\n")
    cfg = load_config([CONF / "demo.yaml", extra])
    assert (cfg.tune.n_trials, cfg.backbone.weights) == (3, "hed-bsds500")


def test_search_space_in_a_file_replaces_the_default_whole(tmp_path: Path):
    extra = tmp_path / "space.yaml"
    extra.write_text("tune:\n  search_space:\n    dropout: {type: float, low: 0.1, high: 0.2}\n")
    assert list(load_config([extra]).tune.search_space) == ["dropout"]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("tune.n_trials=abc", ["tune.n_trials", "'abc'"]),
        ("tune.n_trials=0", ["tune.n_trials", "greater than or equal to 1"]),
        ("tune.n_trails=3", ["tune.n_trails", "unknown key"]),
        ("nosuchsection.x=1", ["nosuchsection", "unknown key"]),
        ("data.val_fraction=1.5", ["data.val_fraction", "1.5"]),
        ("backbone.precision=float16", ["backbone.precision", "bfloat16"]),
        ("backbone.input_size=[16, 16]", ["backbone.input_size", "32x32"]),
        ("data.classes=[a]", ["data.classes", "two distinct classes"]),
        ("decode.background=[0, 0, 300]", ["decode.background", "0..255"]),
        ("tune.search_space.lr={type: float, low: 1, high: 2}", ["tune.search_space", "lr"]),
        ("tune.search_space.dropout={type: uniform}", ["search_space.dropout", "uniform", "int"]),
        ("tune.trial_timeout_s=0", ["tune.trial_timeout_s", "greater than 0"]),
        ("tune.min_complete_fraction=1.5", ["tune.min_complete_fraction", "1.5"]),
    ],
)
def test_bad_values_fail_naming_the_key_and_value(override, expected):
    with pytest.raises(ConfigError) as error:
        load_config([CONF / "demo.yaml"], [override])
    for text in expected:
        assert text in str(error.value)


def test_malformed_override_and_missing_file_are_explained(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        load_config([], ["tune.n_trials"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config([tmp_path / "nope.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config([bad])


def test_flat_dict_and_yaml_round_trip():
    cfg = load_config([CONF / "demo.yaml"])
    flat = to_flat_dict(cfg)
    assert flat["backbone.weights"] == "hed-bsds500"
    assert "tune.search_space" in flat
    import yaml

    assert Config.model_validate(yaml.safe_load(to_yaml(cfg))) == cfg


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        ("dropout: {type: float, low: 0.6, high: 0.2}", ["dropout", "low 0.6 must be <= high 0.2"]),
        ("l2: {type: float, low: 0.0, high: 0.1, log: true}", ["l2", "log range needs low > 0"]),
        ("n_layers: {type: int, low: 0, high: 4, log: true}", ["n_layers", "log range"]),
        ("units: {type: categorical, choices: []}", ["units", "at least 1 item"]),
        ("n_layers: {type: int, low: 0, high: 5}", ["n_layers", "5", "less than or equal to 3"]),
        ("dropout: {type: float, low: 0.0, high: 1.2}", ["dropout", "1.2"]),
        ("batch_size: {type: categorical, choices: [32, 0]}", ["batch_size", "0"]),
        ("units: {type: float, low: 16, high: 64}", ["units", "not floats"]),
        ("lr: {type: float, low: 0.1, high: 0.2}", ["lr", "not a head parameter", "dropout"]),
        ("dropout: {type: float, low: 0.1}", ["dropout", "high", "Field required"]),
        ("dropout: {type: float, low: 0.1, high: 0.2, spread: 1}", ["spread", "unknown key"]),
    ],
)
def test_search_space_is_validated_when_the_config_loads(tmp_path: Path, space, expected):
    extra = tmp_path / "space.yaml"
    extra.write_text(f"tune:\n  search_space:\n    {space}\n")
    with pytest.raises(ConfigError) as error:
        load_config([extra])
    for text in expected:
        assert text in str(error.value)
    assert "tune.search_space" in str(error.value)


def test_search_space_entries_are_typed_by_their_type_key():
    space = Config().tune.search_space
    assert isinstance(space["learning_rate"], FloatSpace) and space["learning_rate"].log
    assert isinstance(space["n_layers"], IntSpace) and space["n_layers"].high == MAX_HEAD_LAYERS
    assert isinstance(space["units"], CategoricalSpace) and space["units"].choices == (
        64,
        128,
        256,
        512,
    )
    assert set(space) <= set(HeadParams.model_fields)


def test_baseline_is_head_params_and_a_partial_override_keeps_the_rest():
    cfg = load_config([], ["tune.baseline.units=64"])
    assert isinstance(cfg.tune.baseline, HeadParams)
    assert cfg.tune.baseline == HeadParams(units=64)
    with pytest.raises(ConfigError, match=r"tune\.baseline\.n_layers"):
        load_config([], ["tune.baseline.n_layers=7"])
    with pytest.raises(ConfigError, match=r"tune\.baseline\.nope: unknown key"):
        load_config([], ["tune.baseline.nope=1"])


def test_trial_timeout_can_be_switched_off():
    assert Config().tune.trial_timeout_s == 3600
    assert load_config([], ["tune.trial_timeout_s=null"]).tune.trial_timeout_s is None
