"""The search's pure logic: features from the cache, counts, leases, verdicts, plots, storage."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState, create_trial

from emotr.cache.store import FeatureCache
from emotr.config_io import load_config
from emotr.data.listing import Listing
from emotr.errors import EmotrError
from emotr.search.report import (
    FailedTrial,
    SearchResult,
    history_figure,
    importance_figure,
    search_failure,
)
from emotr.search.study import (
    LEASE_ATTR,
    check_storage,
    count_trials,
    enqueue_baseline,
    is_stale,
    suggest_params,
)
from emotr.search.training_set import FeatureSet, load_feature_set

FINGERPRINT = "f" * 16
# The search of gap5 alone (the default's features read block-4 taps these caches do not hold).
GAP5_ONLY = "tune.search_space.features={type: categorical, choices: [gap5]}"


def listing_of(n: int = 8) -> Listing:
    images = pd.DataFrame(
        {
            "sha256": [f"{i:064x}" for i in range(n)],
            "label": [i % 2 for i in range(n)],
            "split": ["train" if i < n // 2 else "val" for i in range(n)],
        }
    )
    return Listing(images=images, conflicts=images.iloc[:0], digest="digest")


def cache_with(root: Path, sha256s: list[str]) -> None:
    cache = FeatureCache(str(root), FINGERPRINT, {"test": "1"})
    features = np.arange(len(sha256s) * 4, dtype=np.float32).reshape(-1, 4)
    cache.commit(sha256s, features, [1] * len(sha256s), [1] * len(sha256s))


def test_tune_before_extract_says_to_run_extract(tmp_path: Path):
    cfg = load_config([], [f"cache.root={tmp_path}"])

    with pytest.raises(EmotrError) as error:
        load_feature_set(cfg.cache.root, cfg.tune, listing_of(8), FINGERPRINT)

    assert str(error.value).startswith(
        f"8 images not in the cache for fingerprint {FINGERPRINT}: run `emotr extract` first"
    )
    assert "decode" not in str(error.value)


def test_a_partial_cache_is_an_error_unless_allowed(tmp_path: Path, caplog):
    listing = listing_of(12)
    cache_with(tmp_path, listing.images["sha256"].tolist()[:-2])  # the last two val images
    cfg = load_config([], [f"cache.root={tmp_path}", GAP5_ONLY])

    with pytest.raises(EmotrError, match=r"2 images not in the cache.*allow_partial_cache"):
        load_feature_set(cfg.cache.root, cfg.tune, listing, FINGERPRINT)
    partial = load_config(
        [], [f"cache.root={tmp_path}", "tune.allow_partial_cache=true", GAP5_ONLY]
    )
    features = load_feature_set(partial.cache.root, partial.tune, listing, FINGERPRINT)

    assert (len(features.y_train), len(features.y_val)) == (6, 4)
    assert "2 images not in the cache" in caplog.text
    # Images the extraction just failed to decode are left out without the flag.
    failed = listing.images["sha256"].tolist()[-2:]
    assert (
        len(load_feature_set(cfg.cache.root, cfg.tune, listing, FINGERPRINT, failed=failed).y_val)
        == 4
    )


def test_feature_sets_check_their_shapes():
    x, y = np.zeros((4, 3), np.float32), np.array([0, 1, 0, 1])
    with pytest.raises(EmotrError, match="two class indexes"):
        FeatureSet(x, np.zeros(4), x, y, "f", "s")
    with pytest.raises(EmotrError, match=r"must be \(n, d\)"):
        FeatureSet(x, y[:3], x, y, "f", "s")
    # Cycles (trial -> tune -> trial was one): tests/unit/test_imports.py walks the whole graph.


def frozen(state: TrialState, number: int, **attrs) -> optuna.trial.FrozenTrial:
    value = 0.8 if state == TrialState.COMPLETE else None
    trial = create_trial(state=state, value=value, user_attrs=attrs)
    trial.number = number
    return trial


def test_counts_tell_lost_from_failed_and_add_up_to_the_trials_made():
    trials = [
        frozen(TrialState.COMPLETE, 0),
        frozen(TrialState.PRUNED, 1),
        frozen(TrialState.FAIL, 2, failure="raised"),
        frozen(TrialState.FAIL, 3, failure="timeout"),
        frozen(TrialState.FAIL, 4, failure="lost"),
        frozen(TrialState.FAIL, 5),  # failed before failures were recorded: its code raised
        frozen(TrialState.RUNNING, 6),
        frozen(TrialState.WAITING, 7, retry_of=4),
    ]

    counts = count_trials(trials)

    assert (counts.n_complete, counts.n_pruned, counts.n_failed, counts.n_lost) == (1, 1, 3, 1)
    assert (counts.n_running, counts.n_waiting) == (1, 1)
    assert counts.n_made == len(trials)
    assert counts.as_metrics()["n_lost"] == 1.0


def test_a_lease_goes_stale_after_a_few_heartbeats():
    now = time.time()
    live = frozen(TrialState.RUNNING, 0, **{LEASE_ATTR: now - 50})
    dead = frozen(TrialState.RUNNING, 1, **{LEASE_ATTR: now - 100})

    assert not is_stale(live, heartbeat_s=30, now=now)
    assert is_stale(dead, heartbeat_s=30, now=now)
    assert is_stale(frozen(TrialState.RUNNING, 2), heartbeat_s=30, now=now + 3600)


def result_of(n_complete: int, failed: list[FailedTrial], best: bool = True) -> SearchResult:
    return SearchResult(
        study_name="s",
        best_trial_number=0 if best else None,
        best_value=0.8 if best else None,
        best_params=None,
        best_run_id="best-run" if best else None,
        baseline_value=None,
        baseline_failure=failed[0] if failed else None,
        n_complete=n_complete,
        n_failed=sum(f.failure != "lost" for f in failed),
        n_pruned=0,
        n_lost=sum(f.failure == "lost" for f in failed),
        failed_trials=failed,
        trials=pd.DataFrame(),
        parent_run_id="parent",
        wall_seconds=1.0,
    )


def test_the_verdict_names_failed_and_lost_trials_and_their_runs():
    tune = load_config([], ["tune.n_trials=10"]).tune
    raised = FailedTrial(0, "raised", "run-0", "ValueError: Could not interpret\nactivation")
    lost = [FailedTrial(n, "lost", f"run-{n}", "WorkerCrashedError: died") for n in (3, 4)]

    nothing = search_failure(result_of(0, [raised], best=False), tune)
    too_few = search_failure(result_of(8, [raised, *lost]), tune)

    assert nothing.startswith("no trial of study 's' completed (1 failed, 0 lost, 0 pruned)")
    assert "trial 0 (MLflow run run-0): ValueError: Could not interpret activation" in nothing
    assert "only 8 of tune.n_trials=10" in too_few and "min_complete_fraction=0.9" in too_few
    assert "trial 3 (MLflow run run-3), trial 4 (MLflow run run-4)" in too_few
    assert search_failure(result_of(9, [raised]), tune) is None
    assert result_of(9, [raised]).baseline_text().startswith("failed: trial 0 (MLflow run run-0)")


def test_optuna_plots_name_the_objective_and_show_whole_parameter_names():
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(0))
    study.optimize(
        lambda t: (
            t.suggest_float("learning_rate", 1e-5, 1e-2, log=True)
            + t.suggest_categorical("standardize", [True, False]) * 0.1
        ),
        n_trials=8,
    )

    for figure in (history_figure(study), importance_figure(study)):
        figure.canvas.draw()
        renderer = figure.canvas.get_renderer()
        axes = figure.axes[0]
        texts = [axes.yaxis.label, *axes.get_yticklabels(), axes.xaxis.label]
        legend = axes.get_legend()
        names = [text.get_text() for text in texts] + [
            text.get_text() for text in (legend.get_texts() if legend else [])
        ]
        assert "Objective Value" not in names and "val AUC" in names
        box = figure.bbox
        for text in texts:
            extent = text.get_window_extent(renderer)
            assert extent.x0 >= box.x0 - 0.5 and extent.x1 <= box.x1 + 0.5, text.get_text()
    assert {t.get_text() for t in figure.axes[0].get_yticklabels()} == {
        "learning_rate",
        "standardize",
    }


def test_check_storage_creates_the_sqlite_folder_and_names_an_unusable_storage(tmp_path: Path):
    folder = tmp_path / "new" / "folder"
    check_storage(load_config([], [f"tune.storage=sqlite:///{folder / 'optuna.db'}"]).tune)
    assert (folder / "optuna.db").exists()

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(EmotrError, match=r"tune\.storage sqlite:///.*file/optuna\.db"):
        check_storage(load_config([], [f"tune.storage=sqlite:///{blocker}/optuna.db"]).tune)
    url = "postgresql://optuna:s3cret@127.0.0.1:1/optuna"
    with pytest.raises(EmotrError) as error:
        check_storage(load_config([], [f"tune.storage={url}"]).tune)
    assert "tune.storage postgresql://optuna:***@127.0.0.1:1/optuna" in str(error.value)
    assert "s3cret" not in str(error.value)


def test_a_trial_hands_back_a_typed_outcome():
    from emotr.hyperparams import HeadParams
    from emotr.search.trial import TrialJob, TrialOutcome, train_trial

    rng = np.random.default_rng(0)
    y = np.arange(120) % 2
    x = (rng.normal(size=(120, 8)) + y[:, None]).astype(np.float32)
    features = FeatureSet(x[:80], y[:80], x[80:], y[80:], "f", "s")
    job = TrialJob(HeadParams(units=8), 2, 2, 0, ("negative", "positive"), None, 0, 0)

    outcome = train_trial(features, job)

    assert isinstance(outcome, TrialOutcome) and not outcome.pruned
    assert outcome.n_epochs == 2 and 0 <= outcome.val_auc == outcome.metrics["val_auc"] <= 1
    assert set(outcome.plots) == {
        "plots/roc_curve.png",
        "plots/confusion_matrix.png",
        "plots/learning_curves.png",
    }
    assert outcome.model is not None and outcome.finished >= outcome.started


def test_trial_0_is_the_recipe_and_searched_trials_stop_early():
    tune = load_config().tune
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    enqueue_baseline(study, tune)

    trials = [study.ask() for _ in range(3)]
    zero, *searched = [suggest_params(trial, tune) for trial in trials]

    assert zero == tune.baseline and zero.units == 512 and zero.kernel_init == "he_normal"
    assert not zero.early_stopping
    # Outside the searched trials' one-choice entries: used, not told to Optuna.
    assert not {"kernel_init", "early_stopping"} & set(trials[0].params)
    for params in searched:
        assert params.early_stopping and params.kernel_init == "glorot_uniform"


def test_the_search_space_can_express_the_recipe():
    """Every searched value of trial 0 lies inside the default space (l2 = 0 cannot on a log
    scale; the procedure entries are the searched trials' alone, and so are block 4's features:
    trial 0 and the peer read gap5, the tutorial's)."""
    tune = load_config().tune
    outside = {"l2", "kernel_init", "early_stopping", "features"}
    for name, space in tune.search_space.items():
        if name in outside:
            continue
        value = getattr(tune.baseline, name)
        if hasattr(space, "choices"):
            assert value in space.choices, name
        else:
            assert space.low <= value <= space.high, name
