"""The numbers of a classifier's probabilities, for any number of classes K >= 2.

`val_auc`, the search's objective, is the macro one-vs-rest ROC AUC: the mean over classes of the
AUC of "this class vs the others"; for K = 2 it is exactly the binary AUC of P(class 1). Pure
numpy + scikit-learn: the head (emotr.search.head), the gate (emotr.deploy.gate) and the test-split
score (emotr.deploy.evaluate) all take their numbers from here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_curve,
)

# Keras clips probabilities to [eps, 1 - eps] in its cross-entropies; the val loss does the same.
_EPSILON = 1e-7
_UNSAFE = re.compile(r"[^\w\-./ ]")


def as_probabilities(raw: np.ndarray) -> np.ndarray:
    """(n, K) float64 class probabilities from a head's output: a sigmoid's (n,) or (n, 1)
    P(class 1) becomes [1 - p, p]; (n, K >= 2) is taken as it is."""
    raw = np.asarray(raw, dtype=np.float64)
    if raw.ndim == 1 or (raw.ndim == 2 and raw.shape[1] == 1):
        p = raw.reshape(-1)
        return np.column_stack([1.0 - p, p])
    if raw.ndim == 2 and raw.shape[1] >= 2:
        return raw
    raise ValueError(f"probabilities must be (n,), (n, 1) or (n, K), got shape {raw.shape}")


def predicted_labels(proba: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """The predicted class of each row: class 1 where P(class 1) >= threshold (two classes),
    else the most probable class."""
    proba = np.asarray(proba)
    if proba.shape[1] == 2:
        return (proba[:, 1] >= threshold).astype(np.int64)
    return np.argmax(proba, axis=1).astype(np.int64)


def _binary_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by ranks (Mann-Whitney, ties averaged): equals scikit-learn's roc_auc_score."""
    ranks = rankdata(scores)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def class_aucs(y: np.ndarray, proba: np.ndarray) -> dict[int, float]:
    """One-vs-rest AUC of each class that y holds and that has negatives too, by class index."""
    y = np.asarray(y)
    aucs = {}
    for k in range(proba.shape[1]):
        positive = y == k
        if positive.any() and not positive.all():
            aucs[k] = _binary_auc(positive, proba[:, k])
    return aucs


def macro_auc(y: np.ndarray, proba: np.ndarray) -> float:
    """Mean one-vs-rest ROC AUC over the classes y holds (K = 2: the AUC of P(class 1))."""
    proba = np.asarray(proba)
    if proba.shape[1] == 2:  # both one-vs-rest AUCs are the same number
        y = np.asarray(y)
        if len(np.unique(y)) < 2:
            raise ValueError("AUC needs images of two classes or more; these hold one")
        return _binary_auc(y == 1, proba[:, 1])
    aucs = class_aucs(y, proba)
    if len(aucs) < 2:
        raise ValueError("AUC needs images of two classes or more; these hold one")
    return float(np.mean(list(aucs.values())))


def cross_entropy(y: np.ndarray, proba: np.ndarray) -> float:
    """Mean -log P(true class), probabilities clipped as Keras clips them."""
    picked = np.asarray(proba)[np.arange(len(y)), np.asarray(y, dtype=np.int64)]
    return float(-np.mean(np.log(np.clip(picked, _EPSILON, 1 - _EPSILON))))


def epoch_metrics(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """The per-epoch validation numbers: val_loss, val_accuracy and val_auc (the objective)."""
    return {
        "val_loss": cross_entropy(y, proba),
        "val_accuracy": float(np.mean(predicted_labels(proba) == np.asarray(y))),
        "val_auc": macro_auc(y, proba),
    }


def metric_name(class_name: str) -> str:
    """A class name made safe for an MLflow metric key."""
    return _UNSAFE.sub("_", class_name)


def evaluate(
    y: np.ndarray, proba: np.ndarray, classes: Sequence[str], prefix: str = "val_"
) -> dict[str, float]:
    """AUC (macro for K > 2), accuracy, balanced accuracy, precision, recall, F1 (of class 1 for
    two classes, macro averages for more), log loss, and per class AUC, precision and recall."""
    y = np.asarray(y, dtype=np.int64)
    predicted = predicted_labels(proba)
    labels = list(range(len(classes)))
    average = "binary" if len(classes) == 2 else "macro"
    common = {"labels": labels, "zero_division": 0}
    numbers = {
        "auc": macro_auc(y, proba),
        "accuracy": float(accuracy_score(y, predicted)),
        "balanced_accuracy": float(balanced_accuracy_score(y, predicted)),
        "precision": float(precision_score(y, predicted, average=average, **common)),
        "recall": float(recall_score(y, predicted, average=average, **common)),
        "f1": float(f1_score(y, predicted, average=average, **common)),
        "log_loss": cross_entropy(y, proba),
    }
    precisions = precision_score(y, predicted, average=None, **common)
    recalls = recall_score(y, predicted, average=None, **common)
    aucs = class_aucs(y, proba)
    for k, name in enumerate(classes):
        safe = metric_name(name)
        if k in aucs:
            numbers[f"auc_{safe}"] = aucs[k]
        numbers[f"precision_{safe}"] = float(precisions[k])
        numbers[f"recall_{safe}"] = float(recalls[k])
    return {f"{prefix}{key}": value for key, value in numbers.items()}


def confusion(y: np.ndarray, proba: np.ndarray, n_classes: int) -> np.ndarray:
    """K x K counts, rows = true class, columns = predicted class."""
    return confusion_matrix(y, predicted_labels(proba), labels=list(range(n_classes)))


def roc_curves(
    y: np.ndarray, proba: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray, float] | None]:
    """(fpr, tpr, auc) of each class one vs rest; None for a class without positives or
    negatives."""
    y, aucs = np.asarray(y), class_aucs(y, proba)
    curves: list[tuple[np.ndarray, np.ndarray, float] | None] = []
    for k in range(proba.shape[1]):
        if k not in aucs:
            curves.append(None)
            continue
        fpr, tpr, _ = roc_curve(y == k, proba[:, k])
        curves.append((fpr, tpr, aucs[k]))
    return curves


def bootstrap_auc(
    y: np.ndarray, proba: np.ndarray, *, n_resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(macro AUC, low, high): the AUC of all rows and the percentile interval over resamples of
    rows; resamples of one class are skipped, not redrawn (the interval stays seeded)."""
    y, proba = np.asarray(y), np.asarray(proba)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_resamples):
        rows = rng.integers(0, len(y), len(y))
        try:
            values.append(macro_auc(y[rows], proba[rows]))
        except ValueError:
            continue
    if not values:
        raise ValueError(f"no bootstrap resample of {len(y)} images held two classes")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return macro_auc(y, proba), float(low), float(high)
