"""Config merging and validation: defaults <- YAML <- overrides, typed and checked at start-up."""

from pathlib import Path

import pytest

from emotr.config import Config, ConfigError
from emotr.config_io import DEFAULT_CONFIG, load_config, to_flat_dict, to_yaml
from emotr.hyperparams import MAX_HEAD_LAYERS, CategoricalSpace, FloatSpace, HeadParams, IntSpace

# The user-facing copies (DEFAULT_CONFIG is the package's own, inside emotr/).
CONF = Path(__file__).resolve().parents[2] / "conf"


def test_default_yaml_documents_exactly_the_schema_defaults():
    assert load_config([DEFAULT_CONFIG]) == Config()


@pytest.mark.parametrize("name", ["default", "demo", "smoke", "cluster", "tutorial"])
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
        ("data.classes=[a]", ["data.classes", "two or more distinct classes", "['a']"]),
        ("data.classes=[a, b, a]", ["data.classes", "distinct", "['a', 'b', 'a']"]),
        ("data.test_fraction=1.0", ["data.test_fraction", "1.0"]),
        ("data.test_fraction=-0.1", ["data.test_fraction", "-0.1"]),
        ("data.val_fraction=0.95", ["data.val_fraction 0.95 + data.test_fraction 0.1", "below 1"]),
        ("decode.background=[0, 0, 300]", ["decode.background", "0..255"]),
        ("tune.search_space.lr={type: float, low: 1, high: 2}", ["tune.search_space", "lr"]),
        ("tune.search_space.dropout={type: uniform}", ["search_space.dropout", "uniform", "int"]),
        ("tune.trial_timeout_s=0", ["tune.trial_timeout_s", "greater than 0"]),
        ("tune.min_complete_fraction=1.5", ["tune.min_complete_fraction", "1.5"]),
        ("backbone.name=resnet50", ["backbone.name", "'vgg16'", "'vgg19'", "'resnet50'"]),
        ("backbone.preprocess=torch", ["backbone.preprocess", "'caffe'", "'rescale'", "'torch'"]),
        ("decode.resize=bicubic", ["decode.resize", "'bilinear'", "'nearest'", "'bicubic'"]),
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


def test_the_tutorials_backbone_settings_load_and_the_defaults_stay_todays():
    default = Config()
    assert (default.backbone.name, default.backbone.preprocess) == ("vgg16", "caffe")
    assert default.decode.resize == "bilinear"
    cfg = load_config(
        [], ["backbone.name=vgg19", "backbone.preprocess=rescale", "decode.resize=nearest"]
    )
    assert (cfg.backbone.name, cfg.backbone.preprocess, cfg.decode.resize) == (
        "vgg19",
        "rescale",
        "nearest",
    )


def test_hed_weights_with_vgg19_are_refused_naming_both_keys(tmp_path: Path):
    # demo.yaml sets backbone.weights=hed-bsds500: asking for vgg19 on top of it is the mistake.
    with pytest.raises(ConfigError) as error:
        load_config([CONF / "demo.yaml"], ["backbone.name=vgg19"])
    message = str(error.value)
    assert "backbone.name=vgg19" in message
    assert "backbone.weights=hed-bsds500" in message
    assert "backbone.name=vgg16" in message  # one of the fixes
    extra = tmp_path / "vgg19.yaml"
    extra.write_text("backbone:\n  name: vgg19\n  weights: hed-bsds500\n")
    with pytest.raises(ConfigError, match=r"backbone\.weights=hed-bsds500"):
        load_config([extra])
    assert load_config([CONF / "demo.yaml"], ["backbone.name=vgg19", "backbone.weights=none"])


def test_the_tutorial_config_is_the_notebooks_recipe_alone():
    cfg = load_config([CONF / "tutorial.yaml"])

    assert (cfg.backbone.name, cfg.backbone.input_size) == ("vgg19", (400, 500))
    assert (cfg.backbone.preprocess, cfg.decode.resize) == ("rescale", "nearest")
    assert cfg.backbone.weights == "imagenet"
    assert cfg.tune.n_trials == 1 and cfg.tune.epochs == 100  # trial 0 alone, all 100 epochs
    assert cfg.tune.baseline == HeadParams()  # the schema's defaults are the recipe
    assert cfg.data.val_fraction == 0.2
    # Offline (no ImageNet download here) the same recipe runs on random weights.
    assert load_config([CONF / "tutorial.yaml"], ["backbone.weights=none"]).backbone.name == "vgg19"


def test_kernel_init_and_early_stopping_are_checked_head_parameters():
    with pytest.raises(ConfigError) as error:
        load_config([], ["tune.baseline.kernel_init=he_uniform"])
    for text in ("tune.baseline.kernel_init", "'he_normal'", "'glorot_uniform'", "he_uniform"):
        assert text in str(error.value)
    with pytest.raises(ConfigError, match=r"tune\.search_space.*kernel_init.*he_uniform"):
        load_config(
            [], ["tune.search_space.kernel_init={type: categorical, choices: [he_uniform]}"]
        )
    with pytest.raises(ConfigError, match=r"tune\.baseline\.early_stopping"):
        load_config([], ["tune.baseline.early_stopping=sometimes"])
    searched = load_config([], ["tune.baseline.early_stopping=true"]).tune.baseline
    assert searched.early_stopping and searched == HeadParams(early_stopping=True)


def test_searched_trials_keep_early_stopping_and_keras_default_init():
    """The default space's one-choice entries: searched trials' procedure, not trial 0's."""
    tune = Config().tune
    assert tune.choices("early_stopping") == (True,)
    assert tune.choices("kernel_init") == ("glorot_uniform",)
    assert tune.searched("early_stopping") == [False, True]  # trial 0's, then the searched ones'


def _recipe_rows(readme: str) -> list[str]:
    """The rows of the README's recipe table (section "Reproduce the tutorial")."""
    section = readme.split("## Reproduce the tutorial", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]


def test_the_readme_recipe_table_is_what_conf_tutorial_yaml_loads():
    """Each `key: value` of the table's emotr column is the value conf/tutorial.yaml gives."""
    import re

    import yaml

    cfg = load_config([CONF / "tutorial.yaml"])
    rows = _recipe_rows((CONF.parent / "README.md").read_text())
    pairs = [pair for row in rows for pair in re.findall(r"`([a-z_.]+): ([^`]+)`", row)]
    assert len(pairs) >= 15, pairs
    for key, text in pairs:
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        expected = yaml.safe_load(text)
        assert (list(value) if isinstance(value, tuple) else value) == expected, key


def test_the_packaged_default_config_is_conf_default_yaml_byte_for_byte():
    # The wheel ships emotr/default.yaml (no conf/ there); readers of the repository edit conf/.
    assert DEFAULT_CONFIG.parent == Path(__file__).resolve().parents[2] / "emotr"
    assert DEFAULT_CONFIG.read_bytes() == (CONF / "default.yaml").read_bytes(), (
        "emotr/default.yaml and conf/default.yaml differ: copy the one you edited over the other"
    )


def test_a_command_without_c_loads_the_packaged_default_from_any_directory(tmp_path: Path):
    from tests.run_cli import emotr

    listed = emotr("cache", "ls", cwd=tmp_path)  # no -c: the defaults, outside the checkout
    assert listed.returncode == 0, listed.stderr
    assert "fingerprint" in listed.stdout
    misspelled = emotr("cache", "ls", "cache.rot=x", cwd=tmp_path)
    assert misspelled.returncode == 2
    assert "cache.rot: unknown key; did you mean cache.root?" in misspelled.stderr
    assert str(DEFAULT_CONFIG) in misspelled.stderr.replace("\n", "")


def test_data_classes_default_to_the_folders_and_any_number_of_classes_is_allowed():
    assert Config().data.classes is None
    assert Config().data.test_fraction == 0.1
    four = load_config([], ["data.classes=[angry, happy, neutral, sad]"]).data.classes
    assert four == ("angry", "happy", "neutral", "sad")
    assert load_config([], ["data.test_fraction=0"]).data.test_fraction == 0.0
