"""The plain peer as a head: scikit-learn's LogisticRegressionCV, written into a linear Keras head.

What a user would otherwise pick is one line of scikit-learn on the same cached features:
standardised features and a logistic regression whose L2 strength is chosen by cross-validation
on the training rows. `fit_logreg_cv` fits exactly that and copies the coefficients into the head
`build_head` makes for n_layers 0 (Dense(1, sigmoid) for two classes, Dense(K, softmax) for
more; sklearn's multinomial model is the same softmax), so the peer is logged, registered and
served like any other trial's head. With params.standardize the Keras Normalization layer is
adapted first and the regression is fitted on its own output, so serving applies the very
transform the coefficients were fitted on.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold

from emotr.hyperparams import HeadParams
from emotr.search.head import BINARY, HeadResult, build_head, head_result, predict_proba

# Inverse L2 strengths tried (standardised features: the audit measured 0.003 best on the demo;
# Emotion6 and FER2013 chose 0.005-0.02). Seven values two thirds of a decade apart; weaker
# penalties (C > 1) only slowed lbfgs down (27 s -> 5 s for 1,745 x 512 with this grid, tol and
# max_iter, the same C chosen).
C_GRID = tuple(float(c) for c in np.logspace(-4, 0, 7))
INNER_FOLDS = 3
MAX_ITER = 300
TOLERANCE = 1e-3
FINAL_MAX_ITER = 2000


def fit_logreg_cv(
    params: HeadParams,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    seed: int = 0,
    classes: Sequence[str] = ("negative", "positive"),
) -> HeadResult:
    """Fit LogisticRegressionCV (L2 by an inner stratified CV on the training rows, scored by AUC)
    and return it as a linear Keras head with its validation numbers; one 'epoch' of history."""
    started = time.perf_counter()
    x_train = np.asarray(x_train, dtype=np.float32)
    x_val = np.asarray(x_val, dtype=np.float32)
    y_train = np.asarray(y_train).astype(np.int64)
    y_val = np.asarray(y_val).astype(np.int64)
    linear = params.model_copy(update={"n_layers": 0})
    model = build_head(linear, x_train.shape[1], x_train, len(classes))
    regression = fit_regression(params, _head_inputs(model, x_train), y_train, seed, len(classes))
    score = model.get_layer("score")
    score.set_weights(
        [regression.coef_.T.astype(np.float32), regression.intercept_.astype(np.float32)]
    )
    proba = predict_proba(model, x_val)
    train_proba = predict_proba(model, x_train)
    history = {
        "loss": [_log_loss(y_train, train_proba)],
        "accuracy": [float(np.mean(train_proba.argmax(axis=1) == y_train))],
        "val_loss": [_log_loss(y_val, proba)],
        "val_accuracy": [float(np.mean(proba.argmax(axis=1) == y_val))],
    }
    from emotr.search.metrics import epoch_metrics

    history["val_auc"] = [float(epoch_metrics(y_val, proba)["val_auc"])]
    result = head_result(
        model, history, y_val, proba, time.perf_counter() - started, False, classes
    )
    result.metrics["logreg_c"] = float(regression.C)
    return result


def _head_inputs(model, x: np.ndarray) -> np.ndarray:
    """What the head's output layer sees: x, standardised by the head's own Normalization."""
    try:
        normalize = model.get_layer("standardize")
    except ValueError:  # standardize off: the raw features
        return x
    return np.asarray(normalize(x), dtype=np.float64)


def fit_regression(
    params: HeadParams, x: np.ndarray, y: np.ndarray, seed: int, n_classes: int
) -> LogisticRegression:
    """The peer's regression on rows `x` as given (standardise them first): L2 chosen by
    LogisticRegressionCV over C_GRID on AUC, then refitted at that C to full tolerance."""
    # The inner folds need each class at least INNER_FOLDS times; fewer falls back to 2 folds.
    n_folds = max(2, min(INNER_FOLDS, int(np.bincount(y).min())))
    regression = LogisticRegressionCV(
        Cs=list(C_GRID),
        l1_ratios=(0.0,),  # pure L2 (and scikit-learn 1.10's default, said explicitly)
        use_legacy_attributes=False,
        cv=StratifiedKFold(n_folds, shuffle=True, random_state=seed),
        scoring="roc_auc" if n_classes == BINARY else "roc_auc_ovr",
        class_weight="balanced" if params.class_weight else None,
        max_iter=MAX_ITER,
        tol=TOLERANCE,
        n_jobs=1,
    )
    with warnings.catch_warnings():
        # The weakest penalties may stop at max_iter; the CV then scores them as they are.
        warnings.simplefilter("ignore", ConvergenceWarning)
        regression.fit(x, y)
        # The chosen C fitted to scikit-learn's own tolerance: the coefficients are then those of
        # LogisticRegression(C) on these rows (the loose tolerance only sped up the choice).
        final = LogisticRegression(
            C=float(np.ravel(regression.C_)[0]),
            class_weight=regression.class_weight,
            max_iter=FINAL_MAX_ITER,
        )
        final.fit(x, y)
    return final


def _log_loss(y: np.ndarray, proba: np.ndarray) -> float:
    picked = np.clip(proba[np.arange(len(y)), y], 1e-12, 1.0)
    return float(-np.mean(np.log(picked)))
