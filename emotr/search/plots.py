"""Figures of a fitted head: ROC curve, confusion matrix, learning curves (matplotlib, no pyplot).

Figures are built on `matplotlib.figure.Figure` directly, so workers render them without a display
or pyplot's global figure registry; `to_png` turns one into bytes to ship back to the driver.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure


def roc_figure(fpr: np.ndarray, tpr: np.ndarray, auc: float) -> Figure:
    """ROC curve with its AUC and the chance diagonal."""
    figure = Figure(figsize=(4.5, 4.5), layout="constrained")
    ax = figure.subplots()
    ax.plot(fpr, tpr, label=f"AUC = {auc:.3f}")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    ax.set(xlabel="False positive rate", ylabel="True positive rate", title="ROC curve")
    ax.legend(loc="lower right")
    return figure


def confusion_figure(confusion: np.ndarray, classes: Sequence[str]) -> Figure:
    """2x2 confusion matrix (rows = true class, columns = predicted class) with counts."""
    figure = Figure(figsize=(4.5, 4), layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(confusion, cmap="Blues")
    figure.colorbar(image, ax=ax)
    ticks = range(len(classes))
    ax.set(xticks=ticks, yticks=ticks, xticklabels=classes, yticklabels=classes)
    ax.set(xlabel="Predicted", ylabel="True", title="Confusion matrix (threshold 0.5)")
    threshold = confusion.max() / 2 if confusion.size else 0
    for (row, col), count in np.ndenumerate(confusion):
        color = "white" if count > threshold else "black"
        ax.text(col, row, str(count), ha="center", va="center", color=color)
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
    loss_ax.set(xlabel="Epoch", ylabel="Binary cross-entropy", title="Loss")
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
