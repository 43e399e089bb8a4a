"""Figures of a fitted head: ROC curves, confusion matrix, learning curves (matplotlib, no pyplot).

Figures are built on `matplotlib.figure.Figure` directly, so workers render them without a display
or pyplot's global figure registry; `to_png` turns one into bytes to ship back to the driver.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

# Two classes: a sigmoid head, its label at P(class 1) >= 0.5 and class 1's ROC curve.
_BINARY = 2


def roc_figure(
    curves: Sequence[tuple[np.ndarray, np.ndarray, float] | None],
    classes: Sequence[str],
    auc: float,
) -> Figure:
    """ROC curves and the chance diagonal: class 1's for two classes, one per class (one vs rest)
    for more; `curves` as emotr.search.metrics.roc_curves gives them (None ones are skipped)."""
    if len(curves) != len(classes):
        raise ValueError(f"{len(curves)} ROC curves for {len(classes)} classes {list(classes)}")
    figure = Figure(figsize=(5, 4.5), layout="constrained")
    ax = figure.subplots()
    if len(classes) == _BINARY:
        # Class 0's curve mirrors class 1's: one curve, as before K classes.
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


def normalise_rows(confusion: np.ndarray) -> np.ndarray:
    """Each true class's row as fractions of its count (a class without rows stays zeros)."""
    totals = confusion.sum(axis=1, keepdims=True)
    return np.divide(confusion, totals, out=np.zeros(confusion.shape), where=totals > 0)


def confusion_figure(confusion: np.ndarray, classes: Sequence[str]) -> Figure:
    """K x K confusion matrix (rows = true class, columns = predicted class) in two panels:
    counts, and each row as fractions of its true class (the recall of each class on the diagonal,
    readable when the classes differ in size)."""
    n_classes = len(classes)
    if confusion.shape != (n_classes, n_classes):
        raise ValueError(
            f"a confusion matrix of shape {confusion.shape} for {n_classes} classes {list(classes)}"
        )
    side = max(4.0, 0.6 * n_classes + 2.5)
    figure = Figure(figsize=(2 * side, side), layout="constrained")
    rule = "threshold 0.5" if n_classes == _BINARY else "argmax"
    figure.suptitle(f"Confusion matrix ({rule})")
    counts_ax, fractions_ax = figure.subplots(1, 2)
    counts = np.asarray(confusion)
    texts = [str(int(count)) for count in counts.flat]
    _draw_matrix(counts_ax, counts, texts, classes, top=float(counts.max(initial=0)))
    counts_ax.set_title("Counts")
    fractions = normalise_rows(counts)
    # Shades on a 0-1 scale: the same colour is the same share in every figure.
    texts = [f"{share:.2f}" for share in fractions.flat]
    _draw_matrix(fractions_ax, fractions, texts, classes, top=1.0)
    fractions_ax.set_title("Fraction of each true class")
    return figure


def _draw_matrix(
    ax: Axes, values: np.ndarray, texts: list[str], classes: Sequence[str], top: float
) -> None:
    """A K x K heat map shaded from 0 to `top`, a text per cell, the class names on both axes."""
    ax.imshow(values, cmap="Blues", vmin=0, vmax=top or None)  # all zeros: matplotlib's own
    ticks = range(len(classes))
    ax.set(xticks=ticks, yticks=ticks, xticklabels=classes, yticklabels=classes)
    ax.set(xlabel="Predicted", ylabel="True")
    if len(classes) > 3:  # longer rows of names overlap
        ax.tick_params(axis="x", labelrotation=45)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
            label.set_rotation_mode("anchor")
    dark = top / 2
    for (row, col), value in np.ndenumerate(values):
        color = "white" if value > dark else "black"
        ax.text(col, row, texts[row * len(classes) + col], ha="center", va="center", color=color)


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
