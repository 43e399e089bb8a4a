"""The search's selection: the plain peer is scikit-learn's logistic regression, folds keep units
and classes apart as they should, the refitted head trains on every row, greedy ensembles average
heads and beat the best alone only when they do."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from emotr.config_io import load_config
from emotr.hyperparams import HeadParams
from emotr.search.ensemble import select_ensemble
from emotr.search.folds import CrossValidated, assign_folds, cross_validate, fit_any, fold_aucs
from emotr.search.head import predict_proba
from emotr.search.logreg import fit_logreg_cv
from emotr.search.study import (
    FIXED_ATTR,
    PEER_ATTR,
    enqueue_baseline,
    enqueue_peer,
    peer_params,
    suggest_params,
)
from emotr.search.training_set import FeatureSet

PEER = HeadParams(n_layers=0, standardize=True, solver="logreg_cv")


def blobs(n: int = 300, d: int = 64, k: int = 2, seed: int = 0, offset: float = 3.0):
    """Gaussian features whose class means differ along 8 dimensions, on a shifted scale (so
    that standardising matters)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    rng.shuffle(y)
    x = rng.normal(offset, 2.0, size=(n, d)).astype(np.float32)
    x[:, :8] += 1.0 * y[:, None]
    return x, y.astype(np.int64)


@pytest.mark.parametrize("k", [2, 3])
def test_the_peer_head_equals_scikit_learns_logistic_regression(k):
    x, y = blobs(k=k)
    x_val, y_val = blobs(n=120, k=k, seed=1)
    classes = tuple(f"c{i}" for i in range(k))
    result = fit_logreg_cv(PEER, x[:240], y[:240], x_val, y_val, classes=classes)
    scaler = StandardScaler().fit(x[:240])
    plain = LogisticRegression(C=result.metrics["logreg_c"], max_iter=5000)
    plain.fit(scaler.transform(x[:240]), y[:240])
    expected = plain.predict_proba(scaler.transform(x_val))
    assert np.abs(result.val_proba - expected).max() < 1e-3
    # The head the trial packs (Keras, raw features in) gives the same probabilities.
    assert np.abs(predict_proba(result.model, x_val) - expected).max() < 1e-3
    assert result.metrics["val_auc"] > 0.7


def test_the_peer_chooses_its_l2_by_cross_validation_on_the_training_rows():
    x, y = blobs(n=200, d=256)
    strong = fit_logreg_cv(PEER, x, y, x[:50], y[:50]).metrics["logreg_c"]
    # Labels of pure noise: the inner CV prefers a stronger penalty (smaller C).
    noise = np.random.default_rng(5).permutation(y)
    weak = fit_logreg_cv(PEER, x, noise, x[:50], noise[:50]).metrics["logreg_c"]
    assert weak < strong


def test_logreg_cv_needs_a_linear_head():
    with pytest.raises(ValueError, match="n_layers 0"):
        HeadParams(n_layers=1, solver="logreg_cv")


def test_folds_keep_a_unit_in_one_fold_and_every_class_in_each():
    y = np.array([0, 1] * 50)
    units = [f"group{i // 4}" for i in range(100)]  # four rows per group
    folds = assign_folds(y, units, 5, seed=0)
    for unit in set(units):
        assert len({folds[i] for i in range(100) if units[i] == unit}) == 1
    for fold in range(5):
        assert set(y[folds == fold]) == {0, 1}
    assert np.array_equal(folds, assign_folds(y, units, 5, seed=0))  # reproducible


def test_too_few_images_for_folds_say_how_to_go_on():
    with pytest.raises(ValueError, match=r"tune\.cv_folds=0"):
        assign_folds(np.array([0, 0, 0, 1]), ["a", "b", "c", "d"], 5, seed=0)


def test_no_test_image_reaches_a_fold():
    """The folds are drawn over train + val only: FeatureSet holds no test row."""
    x, y = blobs(n=40)
    features = FeatureSet(
        x_train=x[:30],
        y_train=y[:30],
        x_val=x[30:],
        y_val=y[30:],
        fingerprint="f",
        split_digest="d",
        sha256_train=tuple(f"train{i}" for i in range(30)),
        sha256_val=tuple(f"val{i}" for i in range(10)),
    )
    pooled_x, pooled_y, units = features.pooled()
    assert len(pooled_x) == len(pooled_y) == 40
    assert set(units) == {f"train{i}" for i in range(30)} | {f"val{i}" for i in range(10)}


def test_cross_validation_scores_out_of_fold_and_refits_on_every_row():
    x, y = blobs(n=200)
    folds = assign_folds(y, [str(i) for i in range(200)], 4, seed=0)
    head = HeadParams(n_layers=0, standardize=True, learning_rate=1e-2, early_stopping=True)
    crossed = cross_validate(
        head, x, y, folds, fit_any, epochs=30, patience=5, seed=0, classes=("a", "b")
    )
    assert isinstance(crossed, CrossValidated)
    metrics = crossed.refit.metrics
    assert metrics["val_auc"] == pytest.approx(np.mean(fold_aucs(y, crossed.oof_proba, folds)))
    assert metrics["n_folds"] == 4 and metrics["val_auc_std"] >= 0
    # The refit trained on all 200 rows: its Normalization layer adapted to their mean.
    mean = crossed.refit.model.get_layer("standardize").mean.numpy().ravel()
    assert np.allclose(mean, x.mean(axis=0), atol=1e-3)
    assert not np.allclose(mean, x[folds != 0].mean(axis=0), atol=1e-3)
    # Early stopping stayed in the folds: the refit trains for their mean best epoch, no more.
    assert metrics["refit_epochs"] == max(1, round(metrics["best_epoch"]))


def test_the_peer_cross_validates_like_any_head():
    x, y = blobs(n=150)
    folds = assign_folds(y, [str(i) for i in range(150)], 3, seed=0)
    crossed = cross_validate(PEER, x, y, folds, fit_any, epochs=5, patience=2, seed=0, classes="ab")
    assert isinstance(crossed, CrossValidated) and crossed.refit.metrics["val_auc"] > 0.7


def test_a_greedy_ensemble_averages_heads_that_help_and_only_those():
    rng = np.random.default_rng(0)
    y = np.arange(400) % 2
    folds = np.arange(400) % 5
    signal = y + rng.normal(0, 1.0, 400)

    def head(noise_seed: int) -> np.ndarray:
        p = 1 / (1 + np.exp(-(signal + np.random.default_rng(noise_seed).normal(0, 1.0, 400))))
        return np.column_stack([1 - p, p])

    # Three heads with independent errors: their mean ranks better than any one.
    oof = {n: (head(n), folds) for n in range(3)}
    values = {n: float(np.mean(fold_aucs(y, oof[n][0], folds))) for n in oof}
    choice = select_ensemble(oof, values, y, max_size=5)
    assert choice is not None and len(choice.trials) >= 2
    assert choice.value > max(values.values())
    assert choice.trials[0] == max(values, key=values.get)
    # A copy of the best head adds nothing: no ensemble.
    copies = {0: oof[0], 1: (oof[0][0].copy(), folds)}
    assert select_ensemble(copies, {0: values[0], 1: values[0]}, y, max_size=5) is None


def test_the_peer_is_a_fixed_trial_of_every_search():
    tune = load_config(None).tune
    study = optuna.create_study(direction="maximize")
    enqueue_baseline(study, tune)
    enqueue_peer(study, tune)
    enqueue_peer(study, tune)  # a resumed search does not add it twice
    trials = [study.ask() for _ in range(2)]
    params = [suggest_params(trial, tune) for trial in trials]
    assert params[0] == tune.baseline
    assert params[1] == peer_params(tune)
    assert params[1].solver == "logreg_cv" and params[1].features == "gap5"
    assert trials[1].user_attrs[PEER_ATTR] and FIXED_ATTR in trials[1].user_attrs
    assert len(study.get_trials(deepcopy=False)) == 2
