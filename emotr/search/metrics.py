"""The numbers of a classifier's probabilities for K >= 2 classes: AUC, loss, label metrics, ROC.

Pure numpy + scikit-learn (and scipy's ranks), no Keras: the head, fine-tuning, the gate
(emotr.deploy.gate) and the test-split score (emotr.deploy.evaluate) all take their numbers from
here. Labels are class indexes 0..K-1, probabilities (n, K). A two-class head outputs one sigmoid
P(class 1), which `as_probabilities` turns into the columns [1 - p, p]; its label rule stays
P(class 1) >= 0.5, and K > 2 predicts the argmax.

`val_auc`, the search's objective, has that name for every K: the macro one-vs-rest ROC AUC, the
mean over the classes the labels hold of the AUC of "this class vs the others". For K = 2 both
one-vs-rest AUCs are the binary AUC of P(class 1), so it is computed as that (roc_auc_score, bit for
bit the number emotr reported before K classes).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import (
    accuracy_score,
    auc,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

# Keras clips probabilities to [eps, 1 - eps] in its cross-entropies; the loss here does the same.
_EPSILON = 1e-7
_BINARY = 2
# MLflow's rule for metric keys (its colon left out: MLflow refuses it on Windows).
_UNSAFE = re.compile(r"[^\w./ -]")


def as_probabilities(raw: np.ndarray) -> np.ndarray:
    """(n,) or (n, 1) sigmoid P(class 1) -> (n, 2) [1 - p, p]; (n, K >= 2) as float64."""
    proba = np.asarray(raw, dtype=np.float64)
    if proba.ndim == 2 and proba.shape[1] == 1:
        proba = proba[:, 0]
    if proba.ndim == 1:
        return np.column_stack([1 - proba, proba])
    if proba.ndim == 2 and proba.shape[1] >= _BINARY:
        return proba
    raise ValueError(
        f"scores of shape {proba.shape} are neither P(class 1) of a sigmoid head, shaped (n,) or "
        "(n, 1), nor class probabilities shaped (n, K) with K >= 2; pass the head's output"
    )


def _checked(y: np.ndarray, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels as int64 indexes into proba's columns, and proba as (n, K) float64."""
    proba = as_probabilities(proba)
    labels = np.asarray(y)
    n_classes = proba.shape[1]
    if labels.shape != (len(proba),):
        raise ValueError(
            f"labels of shape {labels.shape} do not match {len(proba)} rows of probabilities; "
            "pass one label per row"
        )
    if not np.isfinite(proba).all():
        n_bad = int((~np.isfinite(proba)).any(axis=1).sum())
        raise ValueError(
            f"{n_bad} of {len(proba)} rows of probabilities hold NaN or inf; leave out the rows "
            "a model could not score (or a head whose training diverged)"
        )
    as_int = labels.astype(np.int64)
    if len(labels) and (np.any(as_int != labels) or as_int.min() < 0 or as_int.max() >= n_classes):
        raise ValueError(
            f"labels must be class indexes 0..{n_classes - 1} (one column of probabilities each), "
            f"got values {np.unique(labels)[:10].tolist()}"
        )
    return as_int, proba


def predicted_labels(proba: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Predicted class indexes: P(class 1) >= threshold for two classes, else the argmax."""
    proba = as_probabilities(proba)
    if proba.shape[1] == _BINARY:
        return (proba[:, 1] >= threshold).astype(np.int64)
    return np.argmax(proba, axis=1)


def _require_two_classes(y: np.ndarray) -> None:
    """Refuse labels of fewer than two classes: no ROC curve then."""
    held = np.unique(y)
    if len(held) < 2:
        raise ValueError(
            f"ROC AUC needs labels of at least two classes; the {len(y)} labels hold "
            f"{held.tolist()}; use a validation set with more classes"
        )


def macro_auc(y: np.ndarray, proba: np.ndarray) -> float:
    """Mean one-vs-rest ROC AUC over the classes y holds (for K = 2, the AUC of P(class 1))."""
    y, proba = _checked(y, proba)
    _require_two_classes(y)
    if proba.shape[1] == _BINARY:
        return float(roc_auc_score(y, proba[:, 1]))
    # By ranks, not roc_auc_score per class: the same number (to ~1e-16) at a tenth of the time
    # (7 classes x 2,000 rows: 14 ms -> 1 ms), which every epoch and each gate resample pay.
    return _rank_macro_auc(y, proba)


def cross_entropy(y: np.ndarray, proba: np.ndarray) -> float:
    """Mean -log P(true class), probabilities clipped to [1e-7, 1 - 1e-7] as Keras does."""
    y, proba = _checked(y, proba)
    if proba.shape[1] == _BINARY:
        # Keras' binary cross-entropy of the one sigmoid output: 1 - p taken of the clipped p.
        p = np.clip(proba[:, 1], _EPSILON, 1 - _EPSILON)
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    p_true = np.clip(proba[np.arange(len(y)), y], _EPSILON, 1 - _EPSILON)
    return float(-np.mean(np.log(p_true)))


def epoch_metrics(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """The per-epoch validation numbers: val_loss, val_accuracy and val_auc."""
    y, proba = _checked(y, proba)
    return {
        "val_loss": cross_entropy(y, proba),
        "val_accuracy": float(np.mean(predicted_labels(proba) == y)),
        "val_auc": macro_auc(y, proba),
    }


def metric_name(class_name: str) -> str:
    """A class name made safe for an MLflow metric key (anything else than letters, digits,
    _ - . / and space becomes _)."""
    name = _UNSAFE.sub("_", str(class_name))
    # MLflow also refuses keys that change as a file path ("a//b", "a/../b", "a/"); keyed after a
    # prefix, only the slashes can do that.
    probe = f"k_{name}"
    if posixpath.normpath(probe) != probe:
        name = name.replace("/", "_")
    return name


def _metric_names(classes: Sequence[str]) -> list[str]:
    names = [metric_name(name) for name in classes]
    if len(set(names)) < len(names):
        raise ValueError(
            f"classes {list(classes)} give the metric names {names}, some twice; rename the "
            "classes so that they differ in letters, digits or _ - . / and space"
        )
    return names


def evaluate(
    y: np.ndarray, proba: np.ndarray, classes: Sequence[str], prefix: str = "val_"
) -> dict[str, float]:
    """Final metrics of a head, every key prefixed: auc, accuracy, balanced_accuracy, precision,
    recall, f1 (of class 1 for K = 2, macro means for K > 2), log_loss, and per class auc_<name>,
    precision_<name>, recall_<name> (auc_<name> left out where the class has no AUC)."""
    y, proba = _checked(y, proba)
    n_classes = len(classes)
    if proba.shape[1] != n_classes:
        raise ValueError(
            f"probabilities have {proba.shape[1]} columns but there are {n_classes} classes "
            f"{list(classes)}; pass the classes the head was trained on"
        )
    names = _metric_names(classes)
    predicted = predicted_labels(proba)
    precision, recall, f1, support = precision_recall_fscore_support(
        y, predicted, labels=range(n_classes), average=None, zero_division=0
    )
    # Class 1's for two classes (sklearn's binary average), the macro means for more.
    pick = (lambda values: values[1]) if n_classes == _BINARY else np.mean
    # Balanced accuracy is the mean recall of the classes y holds.
    metrics = {
        "auc": macro_auc(y, proba),
        "accuracy": accuracy_score(y, predicted),
        "balanced_accuracy": np.mean(recall[support > 0]),
        "precision": pick(precision),
        "recall": pick(recall),
        "f1": pick(f1),
        "log_loss": cross_entropy(y, proba),
    }
    for k, name in enumerate(names):
        metrics[f"precision_{name}"] = precision[k]
        metrics[f"recall_{name}"] = recall[k]
    for k, curve in enumerate(roc_curves(y, proba)):
        if curve is not None:
            metrics[f"auc_{names[k]}"] = curve[2]
    return {f"{prefix}{key}": float(value) for key, value in metrics.items()}


def confusion(y: np.ndarray, proba: np.ndarray, n_classes: int) -> np.ndarray:
    """K x K counts of the predicted labels (rows = true class, columns = predicted class)."""
    y, proba = _checked(y, proba)
    if proba.shape[1] != n_classes:
        raise ValueError(f"probabilities have {proba.shape[1]} columns, not n_classes={n_classes}")
    return confusion_matrix(y, predicted_labels(proba), labels=range(n_classes))


def roc_curves(
    y: np.ndarray, proba: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray, float] | None]:
    """Per class, (fpr, tpr, auc) of its one-vs-rest ROC curve; None without positives or
    negatives."""
    y, proba = _checked(y, proba)
    curves: list[tuple[np.ndarray, np.ndarray, float] | None] = []
    for k in range(proba.shape[1]):
        positive = y == k
        if positive.all() or not positive.any():
            curves.append(None)
            continue
        fpr, tpr, _ = roc_curve(positive, proba[:, k])
        # auc() of roc_curve's points is what roc_auc_score computes.
        curves.append((fpr, tpr, float(auc(fpr, tpr))))
    return curves


def _rank_macro_auc(y: np.ndarray, proba: np.ndarray) -> float:
    """macro_auc from ranks (Mann-Whitney U with ties averaged, which is sklearn's AUC to
    rounding); NaN when y holds fewer than two classes."""
    n, n_classes = proba.shape
    n_pos = np.bincount(y, minlength=n_classes)
    if np.count_nonzero(n_pos) < 2:
        return float("nan")
    if n_classes == _BINARY:  # class 1's AUC (class 0's is the same number)
        ranks = rankdata(proba[:, 1])
        return float((ranks[y == 1].sum() - n_pos[1] * (n_pos[1] + 1) / 2) / (n_pos[1] * n_pos[0]))
    ranks = rankdata(proba, axis=0)
    rank_sums = np.bincount(y, weights=ranks[np.arange(n), y], minlength=n_classes)
    held = n_pos > 0
    u = rank_sums[held] - n_pos[held] * (n_pos[held] + 1) / 2
    return float(np.mean(u / (n_pos[held] * (n - n_pos[held]))))


def bootstrap_auc(
    y: np.ndarray,
    proba: np.ndarray,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """(macro AUC of all rows, low, high): the percentile interval of resampled rows."""
    y, proba = _checked(y, proba)
    if n_resamples < 1 or not 0 < level < 1:
        raise ValueError(
            f"bootstrap needs n_resamples >= 1 and 0 < level < 1, got {n_resamples} and {level}"
        )
    point = macro_auc(y, proba)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_resamples):
        rows = rng.integers(0, len(y), len(y))
        value = _rank_macro_auc(y[rows], proba[rows])
        if not np.isnan(value):  # one class drawn: no AUC; skipped, not redrawn (stays seeded)
            values.append(value)
    if not values:
        raise ValueError(f"no bootstrap resample of {len(y)} rows held two classes")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return point, float(low), float(high)
