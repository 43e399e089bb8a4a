"""Fine-tuning in the default search where the Ray cluster has GPUs (emotr.search.gpus)."""

import pandas as pd
import pytest

from emotr.config import ConfigError
from emotr.config_io import load_config
from emotr.search.gpus import EPOCH_SECONDS, finetune_cost_line, trial_gpus, with_gpu_finetuning
from tests.conftest import SMOKE


def test_a_cluster_with_gpus_adds_finetuning_to_the_search_and_caches_its_activation():
    cfg = load_config([SMOKE], [])
    assert cfg.extract.cache_activation is None and "finetune" not in cfg.tune.search_space

    resolved = with_gpu_finetuning(cfg, cluster_gpus=2)

    assert resolved.tune.search_space["finetune"].choices == (False, True)
    assert resolved.extract.cache_activation == "block4_pool"
    assert resolved.tune.baseline == cfg.tune.baseline  # trial 0 stays the tutorial's recipe
    # Every other choice of the search is kept as it was.
    others = dict(resolved.tune.search_space)
    del others["finetune"]
    assert others == dict(cfg.tune.search_space)


@pytest.mark.parametrize(
    "overrides, gpus",
    [
        ([], 0),  # a CPU-only Ray: frozen features only
        (["tune.finetune_on_gpus=false"], 1),
        # The user's own fine-tuning choice is theirs: kept as written.
        (
            [
                "extract.cache_activation=block4_pool",
                "tune.search_space={finetune: {type: categorical, choices: [true]}}",
            ],
            1,
        ),
        (["extract.cache_activation=block4_pool", "tune.baseline.finetune=true"], 1),
    ],
)
def test_the_config_is_left_as_it_is(overrides, gpus):
    cfg = load_config([SMOKE], overrides)
    assert with_gpu_finetuning(cfg, gpus) is cfg


def test_an_activation_already_cached_is_the_one_fine_tuned():
    cfg = load_config([SMOKE], ["extract.cache_activation=block3_pool"])
    assert with_gpu_finetuning(cfg, 1).extract.cache_activation == "block3_pool"


def test_only_finetuning_trials_on_a_cluster_with_gpus_ask_for_them():
    tune = load_config([SMOKE], ["tune.gpus_per_finetune_trial=0.5"]).tune
    assert trial_gpus(tune, finetune=True, cluster_gpus=1) == 0.5
    assert trial_gpus(tune, finetune=False, cluster_gpus=1) == 0.0
    assert trial_gpus(tune, finetune=True, cluster_gpus=0) == 0.0


def test_gpus_per_finetune_trial_must_be_positive():
    with pytest.raises(ConfigError, match="gpus_per_finetune_trial"):
        load_config([SMOKE], ["tune.gpus_per_finetune_trial=0"])


def test_the_cost_line_gives_the_median_epoch_of_the_trials_that_fine_tuned():
    trials = pd.DataFrame({"number": [0, 1, 2, 3], EPOCH_SECONDS: [None, 2.0, 4.0, 3.0]})
    line = finetune_cost_line(trials, n_images=1304)
    assert line == (
        "fine-tuning block 5: 3 trial(s), 3.0 s per epoch of 1304 images (median; 2.0-4.0 s)"
    )
    assert finetune_cost_line(trials.drop(columns=EPOCH_SECONDS), 1304) is None
    assert finetune_cost_line(trials.assign(**{EPOCH_SECONDS: None}), 1304) is None
