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

Starting from a fitted head is the usual recipe: a random head's large gradients would first
wreck the pretrained filters. The deployable model (emotr.deploy.serving) runs the frozen blocks on
pixels, rounds their output to the cache's dtype (what the trial trained on), then this model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from emotr.config import BackboneConfig, Config, HeadParams
from emotr.search.training_set import FeatureError, FeatureSet

if TYPE_CHECKING:
    import keras

    from emotr.data.listing import Listing
    from emotr.search.head import HeadResult

# VGG16's blocks 4 and 5: three 3x3 convolutions of 512 filters, then a 2x2 max pool.
_CONVS_PER_BLOCK = 3
_FILTERS = 512
_TOP_BLOCK = 5
# How the cache stores activations (emotr.cache.activations); the deployable model rounds to it too.
ACTIVATION_DTYPE = "bfloat16"
# Activations per forward pass outside training: bounds memory at large input sizes.
_PREDICT_BATCH = 64


@dataclass(frozen=True, kw_only=True)
class FineTuneSet(FeatureSet):
    """A FeatureSet plus each image's cached activation (rows in x_train/x_val's order)."""

    a_train: np.ndarray  # (n_train, h, w, c), any float dtype (bfloat16 as cached)
    a_val: np.ndarray
    activation: str  # the VGG16 layer they are the output of, e.g. block4_pool
    # The backbone's weights of the blocks above it, by layer name: where fine-tuning starts.
    block_weights: dict[str, list[np.ndarray]]

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("train", "val"):
            a, y = getattr(self, f"a_{name}"), getattr(self, f"y_{name}")
            if a.ndim != 4 or len(a) != len(y):
                raise FeatureError(f"a_{name} {a.shape} must be (n, h, w, c) with n = {len(y)}")


def trained_blocks(activation: str) -> tuple[int, ...]:
    """The VGG16 blocks above a cached activation: block4_pool -> (5,), block3_pool -> (4, 5)."""
    block = int(activation.removeprefix("block").removesuffix("_pool"))
    return tuple(range(block + 1, _TOP_BLOCK + 1))


def _block_layers(blocks: Sequence[int]) -> list[str]:
    return [f"block{b}_conv{k}" for b in blocks for k in range(1, _CONVS_PER_BLOCK + 1)]


def backbone_block_weights(cfg: BackboneConfig, activation: str) -> dict[str, list[np.ndarray]]:
    """The configured backbone's weights of the convolutions above `activation`, by layer."""
    import keras

    from emotr.extract.backbone import build_extractor

    # float32 build: a bfloat16 policy clone holds the same float32 variables anyway.
    model = build_extractor(cfg.model_copy(update={"precision": "float32"}))
    (conv_base,) = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    return {
        name: conv_base.get_layer(name).get_weights()
        for name in _block_layers(trained_blocks(activation))
    }


def build_finetune_model(
    params: HeadParams,
    activation_shape: Sequence[int],
    activation: str,
    x_adapt: np.ndarray | None = None,
) -> keras.Model:
    """(B, h, w, c) activation -> the VGG16 blocks above it -> GAP -> the head (a nested model).

    x_adapt: pooled features the head's Normalization adapts to (params.standardize).
    """
    import keras

    from emotr.search.head import build_head

    inputs = keras.Input(tuple(activation_shape), name="activation")
    hidden = inputs
    for block in trained_blocks(activation):
        for k in range(1, _CONVS_PER_BLOCK + 1):
            conv = keras.layers.Conv2D(
                _FILTERS, 3, padding="same", activation="relu", name=f"block{block}_conv{k}"
            )
            hidden = conv(hidden)
        hidden = keras.layers.MaxPooling2D(2, strides=2, name=f"block{block}_pool")(hidden)
    pooled = keras.layers.GlobalAveragePooling2D(name="avg_pool")(hidden)
    if params.standardize and x_adapt is None:
        x_adapt = np.zeros((2, _FILTERS), dtype=np.float32)  # load_weights replaces its stats
    head = build_head(params, _FILTERS, x_adapt)
    return keras.Model(inputs, head(pooled), name="finetune")


def _pooled_model(data: FineTuneSet) -> keras.Model:
    """activation -> the backbone's blocks above it -> GAP: the features a head starts on."""
    import keras

    model = build_finetune_model(HeadParams(n_layers=0), data.a_train.shape[1:], data.activation)
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
) -> HeadResult:
    """Fit the head on the backbone's pooled features, then fine-tune blocks and head together.

    The history holds the head's epochs, then the joint ones (metric finetune_from_epoch says
    where they start); on_epoch_end numbers epochs across both, as pruning sees one curve.
    """
    import keras

    from emotr.search.head import fit_head, head_result

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
        epochs=epochs, patience=patience, seed=seed, on_epoch_end=on_epoch_end,
    )  # fmt: skip
    if fitted.stopped_by_callback:  # pruned on the head's curve: no fine-tuning
        return fitted
    model = build_finetune_model(params, data.a_train.shape[1:], data.activation, g_train)
    for name, weights in data.block_weights.items():
        model.get_layer(name).set_weights(weights)
    model.get_layer("head").set_weights(fitted.model.get_weights())
    n_head_epochs = len(fitted.history["val_auc"])
    joint, stopped = _train_jointly(model, params, data, fitted.metrics["val_auc"], n_head_epochs,
                                    seed, on_epoch_end)  # fmt: skip
    history = {key: fitted.history[key] + joint[key] for key in fitted.history}
    scores = predict_batched(model, data.a_val).reshape(-1).astype(np.float64)
    result = head_result(model, history, data.y_val, scores, time.perf_counter() - started, stopped)
    result.metrics["finetune_from_epoch"] = float(n_head_epochs + 1)
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
    (the model's own); leaves the best weights in `model`. Returns the curves and whether
    on_epoch_end stopped it."""
    from emotr.search.head import score_epoch

    step = train_step(model, params)
    best_auc, best_weights, waited, stopped = start_auc, model.get_weights(), 0, False
    rng = np.random.default_rng(seed)
    weights = _sample_weights(params, data.y_train)
    history: dict[str, list[float]] = {}
    for epoch in range(n_done + 1, n_done + params.finetune_epochs + 1):
        loss, accuracy = _train_epoch(step, data.a_train, data.y_train, weights, params, rng)
        logs = {"loss": loss, "accuracy": accuracy}
        logs |= score_epoch(data.y_val, predict_batched(model, data.a_val).reshape(-1))
        for key, value in logs.items():
            history.setdefault(key, []).append(float(value))
        if on_epoch_end is not None and on_epoch_end(epoch, dict(logs)):
            stopped = True
            break
        if logs["val_auc"] > best_auc:
            best_auc, best_weights, waited = logs["val_auc"], model.get_weights(), 0
        else:
            waited += 1
            if waited >= params.finetune_patience:
                break
    model.set_weights(best_weights)
    return history, stopped


def _sample_weights(params: HeadParams, y_train: np.ndarray) -> np.ndarray:
    from emotr.search.head import sample_weights

    return sample_weights(params, np.asarray(y_train).astype(np.int64))


def train_step(model: keras.Model, params: HeadParams) -> Callable:
    """One compiled step: blocks at learning_rate * finetune_lr_scale, head at learning_rate."""
    import keras
    import tensorflow as tf

    head_vars = model.get_layer("head").trainable_variables
    in_head = {id(variable) for variable in head_vars}
    block_vars = [v for v in model.trainable_variables if id(v) not in in_head]
    optimizers = (
        keras.optimizers.Adam(params.learning_rate * params.finetune_lr_scale),
        keras.optimizers.Adam(params.learning_rate),
    )
    optimizers[0].build(block_vars)
    optimizers[1].build(head_vars)
    loss_fn = keras.losses.BinaryCrossentropy()

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
        hits += int(np.sum((np.asarray(p) >= 0.5) == (y == 1)))
    return sum(losses) / len(order), hits / len(order)


def may_finetune(cfg: Config) -> bool:
    """Whether a trial of the search may fine-tune (baseline or a search-space choice)."""
    space = cfg.tune.search_space.get("finetune")
    choices = getattr(space, "choices", ())
    return cfg.tune.baseline.finetune or True in choices


def load_finetune_set(cfg: Config, listing: Listing, features: FeatureSet) -> FineTuneSet:
    """features plus the cached activations of the same images, in the same order."""
    import ml_dtypes

    from emotr.cache.activations import load_activations
    from emotr.cache.store import FeatureCache

    activation = cfg.extract.cache_activation
    if activation is None:
        raise FeatureError(
            "finetune=true needs extract.cache_activation (e.g. block4_pool); set it and run "
            "`emotr extract` again: it adds the activations without extracting features again"
        )
    # The rows load_feature_set took: listed, cached, by split, in listing order.
    cached = FeatureCache.open(cfg.cache.root, features.fingerprint).cached_hashes()
    images = listing.images[listing.images["sha256"].isin(cached)]
    arrays = {}
    for split in ("train", "val"):
        rows = images[images["split"] == split]
        labels = rows["label"].to_numpy(np.int32)
        if not np.array_equal(labels, getattr(features, f"y_{split}")):
            raise FeatureError(f"the {split} rows of the listing and of the features differ")
        # Kept as cached (bfloat16, exact): half the memory of float32 in Ray's object store.
        activations = load_activations(cfg, rows["sha256"].tolist())
        arrays[split] = activations.astype(getattr(ml_dtypes, ACTIVATION_DTYPE))
    return FineTuneSet(
        **{name: getattr(features, name) for name in FeatureSet.__dataclass_fields__},
        a_train=arrays["train"],
        a_val=arrays["val"],
        activation=activation,
        block_weights=backbone_block_weights(cfg.backbone, activation),
    )


class ActivationInput:
    """Pixels -> the cached activation as the trial saw it: the frozen blocks, rounded to the
    cache's dtype, as float32. The input side of a deployable fine-tuned model."""

    def __init__(self, cfg: BackboneConfig, activation: str, batch_size: int):
        from emotr.extract.backbone import FeatureExtractor

        self.activation = activation
        self.extractor = FeatureExtractor(cfg, batch_size=batch_size, outputs=(activation,))

    @property
    def batch_size(self) -> int:
        """Images per forward pass (emotr predict sets it for its extractor actors)."""
        return self.extractor.batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self.extractor.batch_size = value

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 -> (B, h, w, c) float32 activations."""
        import ml_dtypes

        maps = self.extractor.extract_outputs(pixels)[self.activation]
        return maps.astype(getattr(ml_dtypes, ACTIVATION_DTYPE)).astype(np.float32)


def serving_parts(
    head: HeadParams, backbone: BackboneConfig, activation: str, batch_size: int
) -> tuple[Any, keras.Model]:
    """(pixels -> activation, activation -> probability) of a deployable fine-tuned model; the
    caller loads the trained weights into the second."""
    from emotr.taps import activation_shape

    shape = activation_shape(activation, backbone.input_size)
    model = build_finetune_model(head, shape, activation)
    return ActivationInput(backbone, activation, batch_size), model
