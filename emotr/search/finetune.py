"""Deep fine-tuning from a cached activation: VGG16's top block(s) and the head, trained together.

The tutorial's third scenario ("freezing only the first three convolutional blocks") runs the whole
backbone every epoch. Here the frozen blocks ran once, at extraction: their output is cached per
image (extract.cache_activation, e.g. block4_pool, bfloat16). A trial with HeadParams.finetune:

1. runs the blocks above that activation (block 5 for block4_pool) with the backbone's weights
   once over the cached activations and global-average-pools them: the gap5 features;
2. fits the head on those like any trial (emotr.search.head.fit_head: tune.epochs, early stopping);
3. trains those blocks and that head together for up to finetune_epochs epochs, the blocks at
   learning_rate * finetune_lr_scale, with early stopping on val AUC counted from the head's own
   val AUC (best weights restored: fine-tuning never returns a worse model than step 2).

HeadParams.early_stopping=false (the tutorial's procedure) turns both stops off: the head trains
all tune.epochs, blocks and head all finetune_epochs, and the last weights are kept.

Starting from a fitted head is the usual recipe: a random head's large gradients would first
wreck the pretrained filters. Its model: emotr.search.finetune_model; its training set:
emotr.search.finetune_set.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from emotr.hyperparams import HeadParams
from emotr.search import metrics
from emotr.search.finetune_model import build_finetune_model
from emotr.search.finetune_set import FineTuneSet
from emotr.search.gpus import EPOCH_SECONDS
from emotr.search.head import HeadResult, fit_head, head_result, sample_weights
from emotr.search.training_set import FeatureError

# Activations per forward pass outside training: bounds memory at large input sizes.
_PREDICT_BATCH = 64


def _pooled_model(data: FineTuneSet) -> keras.Model:
    """activation -> the backbone's blocks above it -> GAP: the features a head starts on."""
    model = build_finetune_model(
        HeadParams(n_layers=0), data.a_train.shape[1:], data.activation, backbone=data.backbone
    )
    for name, weights in data.block_weights.items():
        model.get_layer(name).set_weights(weights)
    return keras.Model(model.input, model.get_layer("avg_pool").output)


def predict_batched(model: keras.Model, activations: np.ndarray) -> np.ndarray:
    """model(activations) in inference mode, _PREDICT_BATCH rows at a time, as float32."""
    outputs = [
        np.asarray(model(np.asarray(activations[i : i + _PREDICT_BATCH], np.float32)), np.float32)
        for i in range(0, len(activations), _PREDICT_BATCH)
    ]
    return np.concatenate(outputs)


def fit_finetune(
    params: HeadParams,
    data: FineTuneSet,
    *,
    epochs: int,
    patience: int,
    seed: int = 0,
    on_epoch_end: Callable[[int, dict], bool | None] | None = None,
    classes: Sequence[str] = ("negative", "positive"),
) -> HeadResult:
    """Fit the head on the backbone's pooled features, then fine-tune blocks and head together.

    The history holds the head's epochs, then the joint ones (metric finetune_from_epoch says
    where they start); on_epoch_end numbers epochs across both, as pruning sees one curve.
    """
    if not isinstance(data, FineTuneSet):
        raise FeatureError(
            "finetune=true needs the cached activations: set extract.cache_activation "
            "(e.g. block4_pool) and run `emotr extract` (or `emotr run`)"
        )
    keras.utils.set_random_seed(seed)
    started = time.perf_counter()
    pooled = _pooled_model(data)
    g_train, g_val = predict_batched(pooled, data.a_train), predict_batched(pooled, data.a_val)
    fitted = fit_head(
        params, g_train, data.y_train, g_val, data.y_val,
        epochs=epochs, patience=patience, seed=seed, on_epoch_end=on_epoch_end, classes=classes,
    )  # fmt: skip
    if fitted.stopped_by_callback:  # pruned on the head's curve: no fine-tuning
        return fitted
    model = build_finetune_model(
        params,
        data.a_train.shape[1:],
        data.activation,
        g_train,
        backbone=data.backbone,
        n_classes=len(classes),
    )
    for name, weights in data.block_weights.items():
        model.get_layer(name).set_weights(weights)
    model.get_layer("head").set_weights(fitted.model.get_weights())
    n_head_epochs = len(fitted.history["val_auc"])
    joint_started = time.perf_counter()
    joint, stopped = _train_jointly(model, params, data, fitted.metrics["val_auc"], n_head_epochs,
                                    seed, on_epoch_end)  # fmt: skip
    n_joint = len(joint.get("val_auc", []))
    joint_seconds = time.perf_counter() - joint_started
    history = {key: fitted.history[key] + joint[key] for key in fitted.history}
    proba = metrics.as_probabilities(predict_batched(model, data.a_val))
    seconds = time.perf_counter() - started
    result = head_result(model, history, data.y_val, proba, seconds, stopped, classes)
    result.metrics["finetune_from_epoch"] = float(n_head_epochs + 1)
    if n_joint:  # what an epoch of the blocks and the head cost, validation pass included
        result.metrics[EPOCH_SECONDS] = joint_seconds / n_joint
    return result


def _train_jointly(
    model: keras.Model,
    params: HeadParams,
    data: FineTuneSet,
    start_auc: float,
    n_done: int,
    seed: int,
    on_epoch_end: Callable[[int, dict], bool | None] | None,
) -> tuple[dict[str, list[float]], bool]:
    """Up to finetune_epochs joint epochs with early stopping on val AUC counted from start_auc
    (the model's own); leaves the best weights in `model` (params.early_stopping=false: all
    epochs, the last weights). Returns the curves and whether on_epoch_end stopped it."""
    step = train_step(model, params)
    best_auc, best_weights, waited, stopped = start_auc, model.get_weights(), 0, False
    rng = np.random.default_rng(seed)
    weights = _sample_weights(params, data.y_train)
    history: dict[str, list[float]] = {}
    for epoch in range(n_done + 1, n_done + params.finetune_epochs + 1):
        loss, accuracy = _train_epoch(step, data.a_train, data.y_train, weights, params, rng)
        logs = {"loss": loss, "accuracy": accuracy}
        proba = metrics.as_probabilities(predict_batched(model, data.a_val))
        logs |= metrics.epoch_metrics(data.y_val, proba)
        for key, value in logs.items():
            history.setdefault(key, []).append(float(value))
        if on_epoch_end is not None and on_epoch_end(epoch, dict(logs)):
            stopped = True
            break
        if not params.early_stopping:
            continue
        if logs["val_auc"] > best_auc:
            best_auc, best_weights, waited = logs["val_auc"], model.get_weights(), 0
        else:
            waited += 1
            if waited >= params.finetune_patience:
                break
    if params.early_stopping:
        model.set_weights(best_weights)
    return history, stopped


def _sample_weights(params: HeadParams, y_train: np.ndarray) -> np.ndarray:
    return sample_weights(params, np.asarray(y_train).astype(np.int64))


def train_step(model: keras.Model, params: HeadParams) -> Callable:
    """One compiled step: blocks at learning_rate * finetune_lr_scale, head at learning_rate."""
    head_vars = model.get_layer("head").trainable_variables
    in_head = {id(variable) for variable in head_vars}
    block_vars = [v for v in model.trainable_variables if id(v) not in in_head]
    optimizers = (
        keras.optimizers.Adam(params.learning_rate * params.finetune_lr_scale),
        keras.optimizers.Adam(params.learning_rate),
    )
    optimizers[0].build(block_vars)
    optimizers[1].build(head_vars)
    binary = model.output.shape[-1] == 1  # the sigmoid head of two classes
    loss_fn = (
        keras.losses.BinaryCrossentropy()
        if binary
        else keras.losses.SparseCategoricalCrossentropy()
    )

    @tf.function(reduce_retracing=True)
    def step(x, y, w):
        with tf.GradientTape() as tape:
            p = model(x, training=True)
            loss = loss_fn(y, p, sample_weight=w)
            if model.losses:  # the head's L2 penalties
                loss += tf.add_n(model.losses)
        grads = tape.gradient(loss, block_vars + head_vars)
        optimizers[0].apply(grads[: len(block_vars)], block_vars)
        optimizers[1].apply(grads[len(block_vars) :], head_vars)
        return loss, p

    return step


def _train_epoch(
    step: Callable,
    a_train: np.ndarray,
    y_train: np.ndarray,
    weights: np.ndarray,
    params: HeadParams,
    rng: np.random.Generator,
) -> tuple[float, float]:
    """One shuffled pass; mean batch loss and training accuracy (dropout on)."""
    order = rng.permutation(len(a_train))
    losses, hits = [], 0
    for start in range(0, len(order), params.batch_size):
        rows = np.sort(order[start : start + params.batch_size])  # sorted: faster gather
        y = np.asarray(y_train[rows], np.float32).reshape(-1, 1)
        loss, p = step(np.asarray(a_train[rows], np.float32), y, weights[rows])
        losses.append(float(loss) * len(rows))
        predicted = metrics.predicted_labels(metrics.as_probabilities(np.asarray(p)))
        hits += int(np.sum(predicted == y[:, 0]))
    return sum(losses) / len(order), hits / len(order)
