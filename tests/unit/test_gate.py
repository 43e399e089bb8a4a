"""The promotion gate's statistics: paired bootstrap interval of an AUC gap, and the decision."""

import numpy as np
import pytest

from emotr.deploy.gate import compare_auc, decide


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
