"""A head's figures for two and for K classes: they render to PNG and show what they claim."""

from __future__ import annotations

import numpy as np
import pytest

from emotr.search import metrics, plots

PNG = b"\x89PNG\r\n\x1a\n"


def _classes(k: int) -> list[str]:
    return ["negative", "positive"] if k == 2 else [f"emotion {i}" for i in range(k)]


def _validation(k: int, n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and (n, k) probabilities (a sigmoid's [1 - p, p] for two classes)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += 1.5
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, metrics.as_probabilities(proba[:, 1]) if k == 2 else proba


def test_normalised_rows_sum_to_one_and_an_empty_class_stays_zero():
    counts = np.array([[5, 3, 2], [0, 0, 0], [1, 1, 8]])
    fractions = plots.normalise_rows(counts)
    np.testing.assert_allclose(fractions.sum(axis=1), [1.0, 0.0, 1.0])
    np.testing.assert_allclose(fractions[0], [0.5, 0.3, 0.2])
    y, proba = _validation(5)
    np.testing.assert_allclose(
        plots.normalise_rows(metrics.confusion(y, proba, 5)).sum(axis=1), 1.0
    )


@pytest.mark.parametrize("k", [2, 5])
def test_confusion_figure_has_counts_and_fractions(k):
    y, proba = _validation(k)
    figure = plots.confusion_figure(metrics.confusion(y, proba, k), _classes(k))
    assert plots.to_png(figure).startswith(PNG)
    counts_ax, fractions_ax = figure.axes
    rule = "(threshold 0.5)" if k == 2 else "(argmax)"
    assert figure.get_suptitle() == f"Confusion matrix {rule}"
    assert [tick.get_text() for tick in counts_ax.get_xticklabels()] == _classes(k)
    rotation = counts_ax.get_xticklabels()[0].get_rotation()
    assert rotation == (45 if k > 3 else 0)
    n_shown = sum(int(text.get_text()) for text in counts_ax.texts)
    assert n_shown == len(y)  # every validation row counted once
    shares = np.array([float(text.get_text()) for text in fractions_ax.texts]).reshape(k, k)
    np.testing.assert_allclose(shares.sum(axis=1), 1.0, atol=0.01 * k)


def test_confusion_figure_refuses_a_matrix_of_other_classes():
    with pytest.raises(ValueError, match=r"shape \(2, 2\) for 3 classes"):
        plots.confusion_figure(np.zeros((2, 2), dtype=int), ["a", "b", "c"])


def test_roc_figure_of_two_classes_draws_class_1s_curve():
    y, proba = _validation(2)
    curves = metrics.roc_curves(y, proba)
    auc = metrics.macro_auc(y, proba)
    figure = plots.roc_figure(curves, _classes(2), auc)
    assert plots.to_png(figure).startswith(PNG)
    ax = figure.axes[0]
    assert ax.get_title() == "ROC curve"
    _, labels = ax.get_legend_handles_labels()
    assert labels == [f"AUC = {auc:.3f}", "chance"]
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), curves[1][0])


def test_roc_figure_of_k_classes_draws_one_curve_per_class_and_skips_none():
    y, proba = _validation(5)
    keep = y != 3
    curves = metrics.roc_curves(y[keep], proba[keep])
    assert curves[3] is None
    auc = metrics.macro_auc(y[keep], proba[keep])
    figure = plots.roc_figure(curves, _classes(5), auc)
    assert plots.to_png(figure).startswith(PNG)
    ax = figure.axes[0]
    assert ax.get_title() == f"ROC curves, one vs rest (macro AUC = {auc:.3f})"
    _, labels = ax.get_legend_handles_labels()
    expected = [f"emotion {k} (AUC = {curves[k][2]:.3f})" for k in (0, 1, 2, 4)]
    assert labels == [*expected, "chance"]
    with pytest.raises(ValueError, match="5 ROC curves for 4 classes"):
        plots.roc_figure(curves, _classes(4), auc)


@pytest.mark.parametrize("best_epoch", [None, 3])
def test_learning_curves_render_with_a_cross_entropy_axis(best_epoch):
    history = {
        key: list(np.linspace(0.2, 0.8, 5))
        for key in ("loss", "accuracy", "val_loss", "val_accuracy", "val_auc")
    }
    figure = plots.learning_curves_figure(history, best_epoch)
    assert plots.to_png(figure).startswith(PNG)
    assert figure.axes[0].get_ylabel() == "Cross-entropy"
    _, labels = figure.axes[1].get_legend_handles_labels()
    assert ("restored epoch" in labels) == (best_epoch is not None)


def test_a_confusion_matrix_of_zeros_still_renders():
    figure = plots.confusion_figure(np.zeros((3, 3), dtype=int), ["a", "b", "c"])
    assert plots.to_png(figure).startswith(PNG)
    assert {text.get_text() for text in figure.axes[1].texts} == {"0.00"}
