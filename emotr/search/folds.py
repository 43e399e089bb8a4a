"""Selection that does not fool itself: a trial's value is a k-fold cross-validated AUC over the
train and val images, and the head it hands back is refitted on all of them.

One validation split of a few hundred images ranks 30 trials partly by noise: the best of them
is the luckiest as often as the best. Trials on cached features are cheap, so each fits
tune.cv_folds heads, every image is scored once by a head that never saw it (out of fold), and
the trial's value is the mean of the folds' AUCs (their spread is logged beside it). Folds are
drawn by unit -- the manifest's group, else the image's content hash -- stratified by class, so
copies and groups never straddle folds. Early stopping stays inside each fold (it watches the
fold's held-out images); the refit then trains for the folds' mean best epoch. The test split is
never here: FeatureSet holds train and val only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from emotr.hyperparams import HeadParams
from emotr.search import metrics
from emotr.search.head import HeadResult, fit_head, head_result


@dataclass(frozen=True)
class CrossValidated:
    """A trial's cross-validation: the refitted head and the out-of-fold numbers."""

    refit: HeadResult  # trained on every row; its metrics are replaced by the folds'
    oof_proba: np.ndarray  # (n, K): each row scored by the fold head that did not train on it
    folds: np.ndarray  # the fold of each row
    fold_aucs: list[float]
    first_fold: HeadResult  # its curves are the trial's learning curves and what pruning sees


def assign_folds(y: np.ndarray, units: Sequence[str], n_folds: int, seed: int) -> np.ndarray:
    """The fold (0..n_folds-1) of each row: stratified by label, a unit's rows in one fold."""
    codes = np.unique(np.asarray(units, dtype=object).astype(str), return_inverse=True)[1]
    n_folds = min(n_folds, int(np.bincount(np.asarray(y)).min()))
    if n_folds < 2:
        raise ValueError(
            "cross-validation needs two images of each class or more in train + val; "
            "set tune.cv_folds=0 (one validation split) or add images"
        )
    splitter = StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed)
    folds = np.empty(len(y), dtype=np.int64)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(y)), y, groups=codes)):
        folds[held_out] = fold
    return folds


def fold_aucs(y: np.ndarray, proba: np.ndarray, folds: np.ndarray) -> list[float]:
    """The AUC (macro for K > 2) of each fold's held-out rows."""
    return [metrics.macro_auc(y[folds == f], proba[folds == f]) for f in np.unique(folds)]


FitFunction = Callable[..., HeadResult]


def cross_validate(
    params: HeadParams,
    x: np.ndarray,
    y: np.ndarray,
    folds: np.ndarray,
    fit: FitFunction,
    *,
    epochs: int,
    seed: int,
    classes: Sequence[str],
    on_epoch_end: Callable[[int, dict], bool | None] | None = None,
    views: np.ndarray | None = None,
    **fit_args,
) -> CrossValidated | HeadResult:
    """Fit one head per fold, score the held-out rows, then refit on every row.

    `fit` is fit_head's signature (fit_head, fit_logreg_cv). `views` (n, K, d): augmented views
    of the rows, the training rows' passed on as x_views (held-out rows read the plain image).
    Returns the first fold's result alone when on_epoch_end stopped it (a pruned trial is not
    refitted).
    """
    started = time.perf_counter()
    oof = np.zeros((len(y), len(classes)), dtype=np.float64)
    results = []
    for fold in np.unique(folds):
        train, held_out = folds != fold, folds == fold
        result = fit(
            params,
            x[train],
            y[train],
            x[held_out],
            y[held_out],
            epochs=epochs,
            seed=seed + int(fold),
            classes=classes,
            on_epoch_end=on_epoch_end if fold == 0 else None,
            **_views_of(views, train),
            **fit_args,
        )
        if result.stopped_by_callback:
            return result
        oof[held_out] = result.val_proba
        results.append(result)
    refit = fit(
        _refit_params(params),
        x,
        y,
        x,
        y,
        epochs=_refit_epochs(params, results, epochs),
        seed=seed,
        classes=classes,
        **_views_of(views, np.ones(len(y), dtype=bool)),
        **fit_args,
    )
    aucs = fold_aucs(y, oof, folds)
    scored = head_result(
        refit.model, results[0].history, y, oof, time.perf_counter() - started, False, classes
    )
    scored.metrics.update(
        {
            "val_auc": float(np.mean(aucs)),
            "val_auc_std": float(np.std(aucs)),
            "val_auc_oof": metrics.macro_auc(y, oof),
            "best_epoch": float(np.mean([r.metrics["best_epoch"] for r in results])),
            "n_folds": float(len(aucs)),
            "refit_epochs": float(len(refit.history["loss"])),
        }
    )
    return CrossValidated(scored, oof, folds, aucs, results[0])


def _views_of(views: np.ndarray | None, rows: np.ndarray) -> dict[str, np.ndarray]:
    return {} if views is None else {"x_views": views[rows]}


def _refit_params(params: HeadParams) -> HeadParams:
    # No held-out rows to stop on: the refit trains for a number of epochs the folds chose.
    return params.model_copy(update={"early_stopping": False})


def _refit_epochs(params: HeadParams, results: list[HeadResult], epochs: int) -> int:
    """All `epochs` without early stopping; with it, the folds' mean best epoch."""
    if not params.early_stopping:
        return epochs
    return max(1, round(float(np.mean([r.metrics["best_epoch"] for r in results]))))


def fit_any(params: HeadParams, *args, **kwargs) -> HeadResult:
    """fit_head or, for solver logreg_cv, fit_logreg_cv (which takes no epochs or callbacks)."""
    if params.solver == "logreg_cv":
        from emotr.search.logreg import fit_logreg_cv

        for unused in ("epochs", "patience", "on_epoch_end", "x_views"):
            kwargs.pop(unused, None)
        return fit_logreg_cv(params, *args, **kwargs)
    return fit_head(params, *args, **kwargs)
