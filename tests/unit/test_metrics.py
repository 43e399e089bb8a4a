"""K-class metrics: the two-class numbers are exactly the binary ones emotr reported before, the
K-class ones are scikit-learn's one-vs-rest macro numbers, and the bootstrap is fast and seeded."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
from mlflow.utils.validation import _validate_metric_name
from sklearn.metrics import (
    balanced_accuracy_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from emotr.search import metrics


def _binary(seed: int = 0, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Labels and sigmoid P(class 1), rounded so that many scores tie."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = 1 / (1 + np.exp(-(1.5 * y + rng.normal(size=n) - 0.75)))
    return y, np.round(p, 1)


def _k_class(seed: int = 0, n: int = 400, k: int = 5, round_to: int | None = None):
    """Labels 0..k-1 (all present) and softmax probabilities that favour the true class."""
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.arange(k), rng.integers(0, k, n - k)])
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += 1.5
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    if round_to is not None:  # ties; renormalised, as sklearn wants rows summing to 1
        proba = np.round(proba, round_to) + 1e-3
        proba /= proba.sum(axis=1, keepdims=True)
    return y, proba


def test_sigmoid_output_becomes_two_columns():
    p = np.array([0.1, 0.8, 0.5], dtype=np.float32)
    for raw in (p, p.reshape(-1, 1)):
        proba = metrics.as_probabilities(raw)
        assert proba.dtype == np.float64 and proba.shape == (3, 2)
        np.testing.assert_array_equal(proba[:, 1], p.astype(np.float64))
        np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    softmax = np.full((4, 3), 1 / 3, dtype=np.float32)
    assert metrics.as_probabilities(softmax).dtype == np.float64
    assert metrics.as_probabilities(softmax).shape == (4, 3)


@pytest.mark.parametrize("shape", [(), (3, 1, 1), (0, 0)])
def test_other_shapes_are_refused(shape):
    with pytest.raises(ValueError, match=r"shape .* sigmoid head"):
        metrics.as_probabilities(np.zeros(shape))


def test_predicted_labels_threshold_for_two_classes_argmax_for_more():
    p = np.array([0.2, 0.5, 0.7])
    np.testing.assert_array_equal(metrics.predicted_labels(metrics.as_probabilities(p)), [0, 1, 1])
    np.testing.assert_array_equal(metrics.predicted_labels(p, threshold=0.6), [0, 0, 1])
    proba = np.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3], [0.1, 0.1, 0.8]])
    np.testing.assert_array_equal(metrics.predicted_labels(proba), [1, 0, 2])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_class_auc_is_the_binary_auc_exactly_with_ties(seed):
    y, p = _binary(seed)
    assert len(np.unique(p)) < len(p) / 10  # the scores do tie
    proba = metrics.as_probabilities(p)
    assert metrics.macro_auc(y, proba) == roc_auc_score(y, proba[:, 1])
    assert metrics.macro_auc(y, p) == roc_auc_score(y, p)


@pytest.mark.parametrize("round_to", [None, 1])
def test_k_class_auc_is_sklearn_ovr_macro(round_to):
    y, proba = _k_class(round_to=round_to)
    expected = roc_auc_score(y, proba, multi_class="ovr", average="macro")
    assert metrics.macro_auc(y, proba) == pytest.approx(expected, abs=1e-12)
    per_class = [roc_auc_score(y == k, proba[:, k]) for k in range(5)]
    assert metrics.macro_auc(y, proba) == pytest.approx(np.mean(per_class), abs=1e-12)


def test_k_class_auc_averages_only_the_classes_the_labels_hold():
    y, proba = _k_class()
    held = np.isin(y, [0, 3])
    y, proba = y[held], proba[held]
    expected = np.mean([roc_auc_score(y == k, proba[:, k]) for k in (0, 3)])
    assert metrics.macro_auc(y, proba) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("proba", [np.full(5, 0.5), np.full((5, 4), 0.25)])
def test_auc_of_one_class_is_refused(proba):
    with pytest.raises(ValueError, match="at least two classes"):
        metrics.macro_auc(np.ones(5, dtype=int), proba)


def test_bad_labels_are_refused_with_what_is_allowed():
    with pytest.raises(ValueError, match=r"class indexes 0\.\.2"):
        metrics.macro_auc(np.array([0, 1, 3]), np.full((3, 3), 1 / 3))
    with pytest.raises(ValueError, match="do not match 3 rows"):
        metrics.epoch_metrics(np.array([0, 1]), np.full((3, 3), 1 / 3))
    with pytest.raises(ValueError, match="NaN or inf"):
        metrics.macro_auc(np.array([0, 1, 1]), np.array([0.2, np.nan, 0.9]))


def test_two_class_cross_entropy_is_the_binary_formula():
    y, p = _binary()
    p = np.concatenate([p, [0.0, 1.0, 1e-9, 1 - 1e-12]])  # clipped ones too
    y = np.concatenate([y, [1, 0, 0, 1]])
    clipped = np.clip(p, 1e-7, 1 - 1e-7)
    expected = -np.mean(y * np.log(clipped) + (1 - y) * np.log(1 - clipped))
    assert metrics.cross_entropy(y, metrics.as_probabilities(p)) == expected


def test_k_class_cross_entropy_is_the_mean_log_of_the_true_class():
    proba = np.array([[0.7, 0.2, 0.1], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0]])
    y = np.array([0, 1, 2])
    expected = -np.mean(np.log([0.7, 1 - 1e-7, 1e-7]))
    assert metrics.cross_entropy(y, proba) == pytest.approx(expected, rel=1e-12)


def test_epoch_metrics_are_the_loss_accuracy_and_auc():
    y, proba = _k_class()
    numbers = metrics.epoch_metrics(y, proba)
    assert set(numbers) == {"val_loss", "val_accuracy", "val_auc"}
    assert numbers["val_accuracy"] == np.mean(np.argmax(proba, axis=1) == y)
    assert numbers["val_auc"] == metrics.macro_auc(y, proba)
    y2, p = _binary()
    assert metrics.epoch_metrics(y2, p)["val_accuracy"] == np.mean((p >= 0.5) == (y2 == 1))


def test_evaluate_two_classes_matches_the_binary_metrics():
    y, p = _binary()
    numbers = metrics.evaluate(y, metrics.as_probabilities(p), ["negative", "positive"])
    predicted = (p >= 0.5).astype(int)
    assert numbers["val_auc"] == roc_auc_score(y, p)
    assert numbers["val_precision"] == precision_score(y, predicted, zero_division=0)
    assert numbers["val_recall"] == recall_score(y, predicted, zero_division=0)
    assert numbers["val_f1"] == f1_score(y, predicted, zero_division=0)
    assert numbers["val_balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, predicted))
    assert numbers["val_log_loss"] == metrics.cross_entropy(y, p)
    assert numbers["val_auc_positive"] == pytest.approx(roc_auc_score(y, p))
    assert numbers["val_recall_negative"] == recall_score(y, predicted, pos_label=0)


def test_evaluate_k_classes_is_macro_and_per_class():
    classes = ["anger", "joy", "sad ness", "fear/terror", "awe?"]
    y, proba = _k_class()
    numbers = metrics.evaluate(y, proba, classes, prefix="test_")
    predicted = np.argmax(proba, axis=1)
    common = {"labels": range(5), "zero_division": 0}
    assert numbers["test_precision"] == pytest.approx(
        precision_score(y, predicted, average="macro", **common)
    )
    assert numbers["test_recall"] == pytest.approx(recall_score(y, predicted, average="macro"))
    assert numbers["test_f1"] == pytest.approx(f1_score(y, predicted, average="macro", **common))
    assert numbers["test_balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, predicted))
    assert numbers["test_auc_awe_"] == pytest.approx(roc_auc_score(y == 4, proba[:, 4]))
    assert numbers["test_precision_sad ness"] == pytest.approx(
        precision_score(y == 2, predicted == 2)
    )
    assert numbers["test_recall_fear/terror"] == pytest.approx(recall_score(y == 3, predicted == 3))
    assert all(key.startswith("test_") for key in numbers)
    for key in numbers:
        _validate_metric_name(key)  # MLflow takes every key


def test_evaluate_leaves_out_the_auc_of_an_absent_class_and_scores_it_zero():
    y, proba = _k_class()
    keep = y != 2
    numbers = metrics.evaluate(y[keep], proba[keep], ["a", "b", "c", "d", "e"])
    assert "val_auc_c" not in numbers and "val_auc_b" in numbers
    assert numbers["val_recall_c"] == 0.0
    predicted = np.argmax(proba[keep], axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns of the class predicted but absent
        assert numbers["val_balanced_accuracy"] == pytest.approx(
            balanced_accuracy_score(y[keep], predicted)
        )
    with pytest.raises(ValueError, match="5 columns but there are 4 classes"):
        metrics.evaluate(y, proba, ["a", "b", "c", "d"])


def test_metric_names_are_mlflow_keys_and_distinct_ones_are_required():
    for name in ["joy", "colère", "a:b", "x//y", "a/../b", "end/", "tab\there", "ok/fine", "1-2.3"]:
        _validate_metric_name(f"val_auc_{metrics.metric_name(name)}")
    assert metrics.metric_name("ok/fine - 1.2") == "ok/fine - 1.2"
    assert metrics.metric_name("awe?") == "awe_"
    with pytest.raises(ValueError, match="some twice"):
        metrics.evaluate(*_k_class(k=2), ["a?", "a!"])


def test_confusion_rows_are_true_classes():
    y = np.array([0, 0, 1, 2, 2, 2])
    proba = np.eye(4)[[0, 1, 1, 2, 2, 0]]
    expected = np.array([[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(metrics.confusion(y, proba, 4), expected)
    binary = metrics.confusion(np.array([0, 1, 1]), np.array([0.6, 0.5, 0.2]), 2)
    np.testing.assert_array_equal(binary, [[0, 1], [1, 1]])


def test_roc_curves_are_sklearns_one_vs_rest_and_none_where_undefined():
    y, proba = _k_class()
    keep = y != 1
    curves = metrics.roc_curves(y[keep], proba[keep])
    assert len(curves) == 5 and curves[1] is None
    fpr, tpr, _ = roc_curve(y[keep] == 3, proba[keep][:, 3])
    np.testing.assert_array_equal(curves[3][0], fpr)
    np.testing.assert_array_equal(curves[3][1], tpr)
    assert curves[3][2] == roc_auc_score(y[keep] == 3, proba[keep][:, 3])
    yb, p = _binary()
    assert metrics.roc_curves(yb, p)[1][2] == roc_auc_score(yb, p)


@pytest.mark.parametrize("k", [2, 6])
def test_rank_auc_equals_sklearn(k):
    y, proba = _k_class(seed=k, k=k, round_to=1)
    expected = (
        roc_auc_score(y, proba[:, 1])
        if k == 2
        else roc_auc_score(y, proba, multi_class="ovr", average="macro")
    )
    assert metrics._rank_macro_auc(y, proba) == pytest.approx(expected, abs=1e-12)
    assert np.isnan(metrics._rank_macro_auc(np.zeros(len(y), dtype=int), proba))


def test_bootstrap_interval_brackets_the_auc_and_is_seeded():
    y, proba = _k_class()
    auc, low, high = metrics.bootstrap_auc(y, proba, n_resamples=200, seed=3)
    assert auc == metrics.macro_auc(y, proba)
    assert low < auc < high and high - low < 0.2
    assert metrics.bootstrap_auc(y, proba, n_resamples=200, seed=3) == (auc, low, high)
    assert metrics.bootstrap_auc(y, proba, n_resamples=200, seed=4) != (auc, low, high)
    narrow = metrics.bootstrap_auc(y, proba, n_resamples=200, seed=3, level=0.5)
    assert low < narrow[1] < narrow[2] < high


def test_bootstrap_of_two_classes_draws_what_the_gate_draws():
    y, p = _binary(n=60)
    rng = np.random.default_rng(5)
    values = []
    for _ in range(300):
        rows = rng.integers(0, len(y), len(y))
        if y[rows].min() != y[rows].max():
            values.append(roc_auc_score(y[rows], p[rows]))
    expected = np.percentile(values, [2.5, 97.5])
    _, low, high = metrics.bootstrap_auc(y, p, n_resamples=300, seed=5)
    assert (low, high) == pytest.approx(tuple(expected), abs=1e-12)


def test_bootstrap_skips_one_class_resamples_and_refuses_when_none_is_left():
    y, p = np.array([0, 1, 1, 1]), np.array([0.8, 0.9, 0.7, 0.6])
    rng, values = np.random.default_rng(0), []
    for _ in range(100):  # a third of the draws hold one class: skipped, not redrawn
        rows = rng.integers(0, len(y), len(y))
        if y[rows].min() != y[rows].max():
            values.append(roc_auc_score(y[rows], p[rows]))
    assert 100 - len(values) > 20
    _, low, high = metrics.bootstrap_auc(y, p, n_resamples=100, seed=0)
    assert (low, high) == pytest.approx(tuple(np.percentile(values, [2.5, 97.5])), abs=1e-12)
    with pytest.raises(ValueError, match="no bootstrap resample of 2 rows"):
        metrics.bootstrap_auc(np.array([0, 1]), np.array([0.2, 0.8]), n_resamples=1, seed=0)


def test_bootstrap_of_2000_rows_and_7_classes_takes_seconds():
    y, proba = _k_class(n=2000, k=7)
    started = time.perf_counter()
    metrics.bootstrap_auc(y, proba, n_resamples=1000)
    assert time.perf_counter() - started < 10  # ~1.2 s on 2 shared cores
