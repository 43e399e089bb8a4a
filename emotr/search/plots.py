"""Figures of a fitted head: ROC curve, confusion matrix, learning curves (matplotlib, no pyplot).

Figures are built on `matplotlib.figure.Figure` directly, so workers render them without a display
or pyplot's global figure registry; `to_png` turns one into bytes to ship back to the driver.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure


def roc_figure(curves: list, classes: Sequence[str], auc: float) -> Figure:
    """ROC curves with their AUC and the chance diagonal: class 1's for two classes, one per
    class (one vs rest) for more; `curves` as emotr.search.metrics.roc_curves gives them."""
    figure = Figure(figsize=(5, 4.5), layout="constrained")
    ax = figure.subplots()
    if len(classes) == 2:
        shown = [(curves[1], f"AUC = {auc:.3f}")] if curves[1] is not None else []
        title = "ROC curve"
    else:
        shown = [
            (curve, f"{name} (AUC = {curve[2]:.3f})")
            for curve, name in zip(curves, classes, strict=True)
            if curve is not None
        ]
        title = f"ROC curves, one vs rest (macro AUC = {auc:.3f})"
    for (fpr, tpr, _), label in shown:
        ax.plot(fpr, tpr, label=label)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    ax.set(xlabel="False positive rate", ylabel="True positive rate", title=title)
    ax.legend(loc="lower right", fontsize="small")
    return figure


def row_normalised(confusion: np.ndarray) -> np.ndarray:
    """Each true class's row as fractions of that class (a row of zeros stays zeros)."""
    totals = confusion.sum(axis=1, keepdims=True)
    return np.divide(confusion, totals, out=np.zeros(confusion.shape), where=totals > 0)


def confusion_figure(confusion: np.ndarray, classes: Sequence[str]) -> Figure:
    """K x K confusion matrix (rows = true class, columns = predicted class): counts, and each
    row normalised to the share of its true class."""
    size = max(4.0, 0.6 * len(classes) + 2.5)
    figure = Figure(figsize=(2 * size, size), layout="constrained")
    rule = "threshold 0.5" if len(classes) == 2 else "argmax"
    panels = ((confusion, "counts", "{:d}"), (row_normalised(confusion), "by true class", "{:.2f}"))
    for ax, (values, name, text) in zip(figure.subplots(1, 2), panels, strict=True):
        image = ax.imshow(values, cmap="Blues")
        figure.colorbar(image, ax=ax)
        ticks = range(len(classes))
        ax.set(xticks=ticks, yticks=ticks, xticklabels=classes, yticklabels=classes)
        if len(classes) > 3:
            ax.tick_params(axis="x", labelrotation=45)
        ax.set(xlabel="Predicted", ylabel="True", title=f"Confusion matrix, {name} ({rule})")
        threshold = values.max() / 2 if values.size else 0
        for (row, col), value in np.ndenumerate(values):
            color = "white" if value > threshold else "black"
            shown = text.format(int(value)) if text == "{:d}" else text.format(value)
            ax.text(col, row, shown, ha="center", va="center", color=color)
    return figure


def learning_curves_figure(
    history: dict[str, list[float]], best_epoch: int | None = None
) -> Figure:
    """Loss and accuracy/AUC per epoch, train vs validation, with the restored epoch marked."""
    figure = Figure(figsize=(9, 3.5), layout="constrained")
    loss_ax, score_ax = figure.subplots(1, 2)
    epochs = np.arange(1, len(history["loss"]) + 1)
    loss_ax.plot(epochs, history["loss"], label="train")
    loss_ax.plot(epochs, history["val_loss"], label="validation")
    loss_ax.set(xlabel="Epoch", ylabel="Cross-entropy", title="Loss")
    score_ax.plot(epochs, history["accuracy"], label="train accuracy")
    score_ax.plot(epochs, history["val_accuracy"], label="val accuracy")
    score_ax.plot(epochs, history["val_auc"], label="val AUC")
    score_ax.set(xlabel="Epoch", title="Accuracy and AUC")
    for ax in (loss_ax, score_ax):
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle=":", label="restored epoch")
        ax.legend()
    return figure


def to_png(figure: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
