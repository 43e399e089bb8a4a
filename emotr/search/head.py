"""Build and fit a classification head on cached features: one sigmoid unit for two classes (the
tutorial's), a softmax over K for more; its numbers come from emotr.search.metrics.

Speed (measured on 2 cores, 1,304 x 512 features, the tutorial recipe, 100 epochs): Keras' numpy
path with `validation_data` took ~9-15 s, mostly per-step Python and a second evaluation loop each
epoch. Feeding a tf.data pipeline, running a whole epoch per `steps_per_execution` and computing the
validation metrics from one forward pass in a callback brings it to ~3 s with one TF thread.
XLA (`jit_compile=True`) was slower on CPU for a head this small, so it stays off.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf
from sklearn.utils.class_weight import compute_class_weight

# HeadParams is validated config (tune.baseline is one), a leaf that compute code imports too.
from emotr.hyperparams import HeadParams
from emotr.search import metrics

# Two classes keep the tutorial's head: one sigmoid unit, P(class 1), and binary cross-entropy.
BINARY = 2


@dataclass
class HeadResult:
    """A fitted head (the best epoch's weights with early stopping, else the last epoch's), its
    per-epoch history and its validation metrics (of those weights)."""

    model: keras.Model
    history: dict[str, list[float]]
    metrics: dict[str, float]
    val_proba: np.ndarray  # (n, K) class probabilities of the validation rows
    confusion: np.ndarray  # K x K counts, rows = true class
    roc: list  # per class: (fpr, tpr, auc) one vs rest, None where undefined
    train_seconds: float
    # True when on_epoch_end asked to stop (e.g. the trial was pruned).
    stopped_by_callback: bool = False


def build_head(
    params: HeadParams,
    n_features: int,
    x_train: np.ndarray | None = None,
    n_classes: int = BINARY,
) -> keras.Model:
    """[Normalization adapted on x_train] -> n_layers x (Dense, Dropout) -> the output layer:
    Dense(1, sigmoid) for two classes (the tutorial's), Dense(n_classes, softmax) for more.

    HeadParams bounds n_layers by hyperparams.MAX_HEAD_LAYERS, the depth this builds. The hidden
    kernels start from params.kernel_init; the output layer keeps Keras' default (glorot_uniform),
    as the tutorial's Dense(1, sigmoid) did. params.l2 penalises every kernel, the output layer's
    too: a linear head (n_layers 0) is then ridge logistic regression, not an unregularised one
    whose l2 changes nothing (and whose class activation maps are noise where it overfits).
    """
    inputs = keras.Input(shape=(n_features,), name="features")
    hidden = inputs
    if params.standardize:
        if x_train is None:
            raise ValueError("standardize=True needs x_train to adapt the Normalization layer")
        # Part of the model, so that the saved head takes raw features.
        normalize = keras.layers.Normalization(name="standardize")
        normalize.adapt(x_train)
        hidden = normalize(hidden)
    regularizer = keras.regularizers.L2(params.l2) if params.l2 > 0 else None
    for index in range(params.n_layers):
        hidden = keras.layers.Dense(
            params.units,
            activation=keras.activations.get(params.activation),
            kernel_initializer=params.kernel_init,
            kernel_regularizer=regularizer,
            name=f"dense_{index}",
        )(hidden)
        hidden = keras.layers.Dropout(params.dropout, name=f"dropout_{index}")(hidden)
    if n_classes == BINARY:
        outputs = keras.layers.Dense(
            1, activation="sigmoid", kernel_regularizer=regularizer, name="score"
        )(hidden)
    else:
        outputs = keras.layers.Dense(
            n_classes, activation="softmax", kernel_regularizer=regularizer, name="score"
        )(hidden)
    return keras.Model(inputs, outputs, name="head")


class _ValidationMetrics(keras.callbacks.Callback):
    """val_loss, val_accuracy and val_auc from one forward pass over the whole validation set."""

    def __init__(self, x_val: np.ndarray, y_val: np.ndarray, report: Callable | None):
        super().__init__()
        self.x_val = tf.convert_to_tensor(x_val)
        self.y_val = y_val
        self.report = report
        self.stopped_by_callback = False

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs if logs is not None else {}
        logs.update(metrics.epoch_metrics(self.y_val, predict_proba(self.model, self.x_val)))
        if self.report is not None and self.report(epoch + 1, dict(logs)):
            self.stopped_by_callback = True
            self.model.stop_training = True


def predict_proba(model: keras.Model, x: np.ndarray | tf.Tensor) -> np.ndarray:
    """(n, K) class probabilities in inference mode (one call, no predict() loop overhead); a
    sigmoid head's P(class 1) becomes the two columns [1 - p, p]."""
    return metrics.as_probabilities(np.asarray(model(x, training=False), dtype=np.float64))


def loss_name(n_classes: int) -> str:
    """The Keras loss of a head with n_classes outputs (labels are class indexes)."""
    return "binary_crossentropy" if n_classes == BINARY else "sparse_categorical_crossentropy"


def sample_weights(params: HeadParams, y_train: np.ndarray) -> np.ndarray:
    """Per-row loss weights: 1, or balanced class weights (params.class_weight)."""
    if not params.class_weight:
        return np.ones(len(y_train), dtype=np.float32)
    classes = np.unique(y_train)
    weights = compute_class_weight("balanced", classes=classes, y=y_train)
    lookup = dict(zip(classes.tolist(), weights.tolist(), strict=True))
    return np.array([lookup[label] for label in y_train.tolist()], dtype=np.float32)


def _train_dataset(
    params: HeadParams,
    x_train: np.ndarray,
    y_train: np.ndarray,
    seed: int,
    x_views: np.ndarray | None = None,
) -> tf.data.Dataset:
    """Shuffled batches of (features, label, weight); with x_views (n, K, d) each row's features
    are, anew each epoch, the plain image's or one of its K augmented views' (drawn uniformly)."""
    weights = sample_weights(params, y_train)
    if x_views is None:
        data = (x_train, y_train.astype(np.float32), weights)
        dataset = tf.data.Dataset.from_tensor_slices(data)
    else:
        stacked = np.concatenate([x_train[:, None, :], x_views.astype(np.float32)], axis=1)
        n_choices = stacked.shape[1]
        dataset = tf.data.Dataset.from_tensor_slices(
            (stacked, y_train.astype(np.float32), weights)
        ).map(
            lambda views, label, weight: (
                tf.gather(views, tf.random.uniform([], 0, n_choices, tf.int32, seed=seed)),
                label,
                weight,
            )
        )
    return (
        dataset.shuffle(len(x_train), seed=seed, reshuffle_each_iteration=True)
        .batch(params.batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )


def fit_head(
    params: HeadParams,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    epochs: int,
    patience: int,
    seed: int = 0,
    on_epoch_end: Callable[[int, dict], bool | None] | None = None,
    classes: Sequence[str] = ("negative", "positive"),
    x_views: np.ndarray | None = None,
) -> HeadResult:
    """Train a head on labels 0..len(classes)-1 and score it: with params.early_stopping,
    stopping after `patience` epochs without a better val AUC, the best epoch's weights restored;
    without, all `epochs` epochs, the last epoch's weights kept (the tutorial's procedure;
    `patience` is unused).

    on_epoch_end(epoch, logs) is called after every epoch (1-based) with the train and validation
    numbers; returning True stops training after that epoch (used for pruning).
    x_views (n_train, K, d): augmented views of the training rows, one drawn per row and epoch
    when params.train_views (validation reads the plain rows).
    """
    if len(np.unique(y_val)) < 2 or len(np.unique(y_train)) < 2:
        raise ValueError("train and validation labels must both hold two classes or more")
    if params.train_views and x_views is None:
        raise ValueError(
            "train_views needs cached augmented views: set extract.views (e.g. 4) and run "
            "`emotr extract`, or leave train_views out of the search"
        )
    keras.utils.set_random_seed(seed)
    x_train = np.asarray(x_train, dtype=np.float32)
    x_val = np.asarray(x_val, dtype=np.float32)
    y_train = np.asarray(y_train).astype(np.int64)
    y_val = np.asarray(y_val).astype(np.int64)
    model = build_head(params, x_train.shape[1], x_train, len(classes))
    n_steps = -(-len(x_train) // params.batch_size)
    model.compile(
        optimizer=keras.optimizers.Adam(params.learning_rate),
        loss=loss_name(len(classes)),
        metrics=["accuracy"],
        # One graph call per epoch: per-step Python dispatch dominated a head this small.
        steps_per_execution=n_steps,
        jit_compile=False,
    )
    validation = _ValidationMetrics(x_val, y_val, on_epoch_end)
    callbacks: list[keras.callbacks.Callback] = [validation]
    if params.early_stopping:  # after `validation`: it reads the val_auc that one writes
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor="val_auc", mode="max", patience=patience, restore_best_weights=True
            )
        )
    started = time.perf_counter()
    fitted = model.fit(
        _train_dataset(params, x_train, y_train, seed, x_views if params.train_views else None),
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )
    train_seconds = time.perf_counter() - started
    history = {
        key: [float(value) for value in fitted.history[key]]
        for key in ("loss", "accuracy", "val_loss", "val_accuracy", "val_auc")
    }
    proba = predict_proba(model, x_val)
    stopped = validation.stopped_by_callback
    return head_result(model, history, y_val, proba, train_seconds, stopped, classes)


def head_result(
    model: keras.Model,
    history: dict[str, list[float]],
    y_val: np.ndarray,
    proba: np.ndarray,
    train_seconds: float,
    stopped_by_callback: bool,
    classes: Sequence[str],
) -> HeadResult:
    """A HeadResult from a trained model's history and its (n, K) validation probabilities."""
    return HeadResult(
        model=model,
        history=history,
        metrics={
            **metrics.evaluate(y_val, proba, classes),
            # The restored epoch with early stopping; without it, where the curve peaked.
            "best_epoch": float(int(np.argmax(history["val_auc"])) + 1),
        },
        val_proba=proba,
        confusion=metrics.confusion(y_val, proba, len(classes)),
        roc=metrics.roc_curves(y_val, proba),
        train_seconds=train_seconds,
        stopped_by_callback=stopped_by_callback,
    )
