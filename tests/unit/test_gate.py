"""The promotion gate's statistics: paired bootstrap interval of an AUC gap (macro AUC for K > 2
classes), and the decision; binary comparisons are unchanged."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from emotr.deploy.gate import compare_auc, decide
from emotr.search import metrics


def _scores(seed: int, n: int = 200, strength: float = 2.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, y * strength + rng.normal(size=n)


def test_a_clearly_better_challenger_has_an_interval_above_zero():
    y, good = _scores(0, strength=3.0)
    weak = y * 0.3 + np.random.default_rng(1).normal(size=len(y))
    comparison = compare_auc(y, good, weak, n_resamples=300, seed=0)
    assert comparison.auc_challenger > comparison.auc_champion
    assert 0 < comparison.low <= comparison.delta <= comparison.high
    assert decide(comparison, min_delta=0.0).promote


def test_the_same_scores_are_not_promoted_and_the_reason_says_why():
    y, scores = _scores(2)
    comparison = compare_auc(y, scores, scores, n_resamples=200)
    assert comparison.low == comparison.high == 0.0
    decision = decide(comparison, min_delta=0.0)
    assert not decision.promote
    assert "not above min_delta 0" in decision.reason and "--force" in decision.reason
    assert decide(comparison, min_delta=0.0, force=True).promote


def test_no_champion_promotes():
    decision = decide(None, min_delta=0.5)
    assert decision.promote and "no champion" in decision.reason


def test_the_interval_is_seeded():
    y, a = _scores(3)
    _, b = _scores(4)
    first = compare_auc(y, a, b[: len(y)], n_resamples=200, seed=7)
    assert compare_auc(y, a, b[: len(y)], n_resamples=200, seed=7) == first
    assert compare_auc(y, a, b[: len(y)], n_resamples=200, seed=8) != first


def test_resamples_of_one_class_are_skipped():
    y = np.array([0, 1, 0])
    comparison = compare_auc(y, np.array([0.1, 0.9, 0.2]), np.array([0.5, 0.4, 0.6]), seed=0)
    assert 0 < comparison.n_resamples < 1000


def test_one_class_is_refused():
    with pytest.raises(ValueError, match="both classes"):
        compare_auc(np.zeros(4), np.ones(4), np.ones(4))


def _old_compare(y, challenger, champion, n_resamples, seed):
    """The binary gate before K classes: its decisions must not change."""
    rng, deltas = np.random.default_rng(seed), []
    for _ in range(n_resamples):
        rows = rng.integers(0, len(y), len(y))
        if y[rows].min() == y[rows].max():
            continue
        deltas.append(
            roc_auc_score(y[rows], challenger[rows]) - roc_auc_score(y[rows], champion[rows])
        )
    tail = (1 - 0.95) / 2 * 100  # 2.5000000000000022, as the gate computed it
    return roc_auc_score(y, challenger), *np.percentile(deltas, [tail, 100 - tail]), len(deltas)


def test_binary_comparisons_are_those_of_before():
    y, a = _scores(5, n=40)
    b = np.round(a + np.random.default_rng(6).normal(size=len(y)), 1)  # ties too
    sigmoid = 1 / (1 + np.exp(-a))
    comparison = compare_auc(y, sigmoid.reshape(-1, 1), b, n_resamples=300, seed=2)
    auc, low, high, n_resamples = _old_compare(y, sigmoid, b, 300, 2)
    assert (comparison.auc_challenger, comparison.low, comparison.high) == (auc, low, high)
    assert comparison.n_resamples == n_resamples and comparison.n_classes == 2
    assert decide(comparison, 0.0).reason.startswith("AUC challenger")


def _k_class(seed: int, n: int = 300, k: int = 4, strength: float = 2.0):
    """Labels of k classes and softmax probabilities favouring the true class by `strength`."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += strength
    return y, np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


def test_a_better_k_class_model_is_promoted_on_macro_auc():
    y, good = _k_class(0, strength=3.0)
    _, weak = _k_class(0, strength=0.5)
    comparison = compare_auc(y, good, weak, n_resamples=300)
    assert comparison.n_classes == 4
    assert comparison.auc_challenger == metrics.macro_auc(y, good)
    assert 0 < comparison.low <= comparison.delta <= comparison.high
    decision = decide(comparison, min_delta=0.0)
    assert decision.promote and decision.reason.startswith("macro AUC challenger")


def test_a_shuffled_k_class_model_is_not_promoted():
    y, champion = _k_class(1)
    shuffled = champion[np.random.default_rng(2).permutation(len(y))]
    comparison = compare_auc(y, shuffled, champion, n_resamples=300)
    assert comparison.high < 0
    decision = decide(comparison, min_delta=0.0)
    assert not decision.promote and "macro AUC" in decision.reason


def test_k_class_resamples_of_one_class_are_skipped_and_seeded():
    y = np.array([0, 1, 2, 2])
    a, b = np.eye(3)[[0, 1, 2, 1]], np.full((4, 3), 1 / 3)
    comparison = compare_auc(y, a, b, n_resamples=200, seed=3)
    assert 0 < comparison.n_resamples < 200
    assert compare_auc(y, a, b, n_resamples=200, seed=3) == comparison


def test_models_of_different_classes_are_refused():
    y, proba = _k_class(3)
    with pytest.raises(ValueError, match="4 classes and the champion 2"):
        compare_auc(y, proba, proba[:, 1])
    with pytest.raises(ValueError, match="two or more of the 4 classes"):
        compare_auc(np.full(len(y), 2), proba, proba)
