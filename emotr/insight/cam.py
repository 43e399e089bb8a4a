"""Class activation maps of a deployable model (emotr.deploy.serving.ImageScorer), exact and cheap.

The math. A head reads features f = pool(A) of a block output A (h, w, C): global average (gap)
or max (gmp) pooling of block{b}_pool. Let y be the score of the predicted class: for a sigmoid
head (two classes) its logit z when it predicts class 1 and -z when it predicts class 0; for a
softmax head the pre-softmax logit of the predicted class. Logits are exact: the head's last
Dense layer's kernel and bias applied to its input, as that layer computes them. Then

    g = dy/df                  (the head alone: a tiny backward pass, none through VGG)
    M = sum_k g_k A_k          (h, w): the raw map, in units of y

For gap, dy/dA_ij^k = g_k / (h w), so g_k = sum_ij dy/dA_ij^k and M is Grad-CAM with weights
alpha_k = sum_ij dy/dA_ij^k (the paper's mean times h w: the same picture once normalised); for
gmp the gradient sits at each channel's argmax and sums to g_k too. For a linear head without
Normalization g = w, and M is the CAM of Zhou et al. (2016): mean_ij M = y - b. With
Normalization (head.standardize) g holds its 1/sigma: autodiff keeps the map exact.

A features choice of several taps (gap4+gap5, gap5_flipavg, ...): g is cut at the taps' widths
(a `_flipavg` term gives half of its slice to the tap and half to its mirror tap); each tap's
slice weights its own block's map; a `_flip` tap's map is mirrored back left-right; the maps are
upsampled bilinearly to the grid of the finest block among them and summed. A fine-tuned model
(spec.activation) carries its own block 5: A is the output of its block5_pool and g the gradient
of its head with respect to the pooled block 5 (exactly sum_ij dy/dA_ij^k, as above).

Keras is imported inside the functions: the CLI loads this module before any model is needed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from emotr.errors import EmotrError
from emotr.extract.backbone import FeatureExtractor
from emotr.search.metrics import as_probabilities, predicted_labels
from emotr.taps import combine_features, parse_features, parse_tap, taps_of

# The Ray Data outputs of CamModel.extract_outputs (what `emotr explain`'s actors hand back).
PROBA_OUTPUT = "proba"
MAP_OUTPUT = "cam"
_TOP_BLOCK = 5


class CamError(EmotrError, ValueError):
    """A model whose class activation maps emotr cannot draw; the message says what to do."""


@dataclass(frozen=True)
class Explanation:
    """Class probabilities, predicted classes and raw maps of a batch of images."""

    proba: np.ndarray  # (n, K) float64, as ImageScorer.score_features gives them
    predicted: np.ndarray  # (n,) int64: the class each map explains (the scorer's label)
    maps: np.ndarray  # (n, gh, gw) float32 raw signed maps M on the grid of map_grid()


def map_grid(spec: Any) -> tuple[int, int]:
    """(gh, gw) of a model's raw maps: the grid of the finest block its features pool."""
    if getattr(spec, "members", ()):
        # The maps follow one head's gradient; an average of heads on different taps has none.
        raise CamError(
            f"an ensemble of {len(spec.members)} heads has no class activation map: explain "
            "the version of one of its trials instead"
        )
    blocks = (
        [_TOP_BLOCK]
        if spec.activation
        else [parse_tap(t).block for t in taps_of(spec.head.features)]
    )
    return _block_grid(spec.backbone.input_size, min(blocks))


def _block_grid(input_size, block: int) -> tuple[int, int]:
    height, width = input_size
    for _ in range(block):  # each 2x2 max pool (valid padding) floors
        height, width = height // 2, width // 2
    return height, width


class CamModel:
    """pixels -> probabilities and maps with a scorer's own graphs and weights.

    The block outputs come from the scorer's extractor model (the inputs of its pooling layers),
    so the probabilities are the scorer's. Batched like FeatureExtractor: chunks of batch_size.
    """

    def __init__(self, scorer: Any, batch_size: int = 32):
        self.spec = scorer.spec
        self.batch_size = batch_size
        self.grid = map_grid(self.spec)
        self.finetuned = self.spec.activation is not None
        if self.finetuned:
            self._input = scorer.extractor  # pixels -> the cached activation, as served
            self._blocks, head = _finetune_parts(scorer.head)
            self._taps: tuple[str, ...] = ("gap5",)
        else:
            self._input = None
            self._taps = taps_of(self.spec.head.features)
            self._blocks = _tapped_blocks(_feature_extractor(scorer).model, self._taps)
            head = scorer.head
        self._trunk, self._score = _logit_parts(head)

    def explain(self, pixels: np.ndarray) -> Explanation:
        """Probabilities, predicted classes and raw maps of (B, H, W, 3) uint8 images."""
        parts = [
            self._explain_chunk(pixels[start : start + self.batch_size])
            for start in range(0, len(pixels), self.batch_size)
        ]
        if not parts:
            k = len(self.spec.classes)
            return Explanation(
                np.zeros((0, k)), np.zeros(0, np.int64), np.zeros((0, *self.grid), np.float32)
            )
        return Explanation(
            *(
                np.concatenate([getattr(p, f) for p in parts])
                for f in ("proba", "predicted", "maps")
            )
        )

    def extract_outputs(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """The Ray Data actor's outputs: float32 probabilities (B, K) and raw maps (B, gh, gw)."""
        result = self.explain(pixels)
        return {PROBA_OUTPUT: result.proba.astype(np.float32), MAP_OUTPUT: result.maps}

    def _explain_chunk(self, pixels: np.ndarray) -> Explanation:
        inputs = self._input(pixels) if self._input is not None else pixels
        values = self._blocks.predict_on_batch(inputs)
        maps = {tap: np.asarray(values[f"map_{tap}"], np.float32) for tap in self._taps}
        pooled = {tap: np.asarray(values[f"pool_{tap}"], np.float32) for tap in self._taps}
        features = (
            pooled["gap5"] if self.finetuned else combine_features(self.spec.head.features, pooled)
        )
        proba, predicted, gradient = self._head_gradient(features)
        return Explanation(proba, predicted, self._weighted_maps(maps, gradient))

    def _head_gradient(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(probabilities, predicted classes, dy/df) of the head on features (B, D)."""
        from keras import ops

        found: dict[str, np.ndarray] = {}

        def logits_of(x):
            return ops.matmul(self._trunk(x, training=False), self._score.kernel) + self._score.bias

        def cotangent(logits) -> np.ndarray:
            # The head's own output activation on these logits: the scorer's probabilities.
            found["proba"] = as_probabilities(ops.convert_to_numpy(self._score.activation(logits)))
            found["predicted"] = predicted_labels(found["proba"], self.spec.threshold)
            if logits.shape[1] == 1:  # sigmoid: y = z for class 1, -z for class 0
                return np.where(found["predicted"] == 1, 1.0, -1.0)[:, None].astype(np.float32)
            return np.eye(logits.shape[1], dtype=np.float32)[found["predicted"]]

        gradient = logits_gradient(logits_of, features.astype(np.float32), cotangent)
        return found["proba"], found["predicted"], gradient

    def _weighted_maps(self, maps: dict[str, np.ndarray], gradient: np.ndarray) -> np.ndarray:
        """sum_k g_k A_k per tap, flips mirrored back, upsampled to self.grid and summed."""
        total = np.zeros((len(gradient), *self.grid), np.float64)
        for tap, weights in _tap_gradients(
            self._taps, None if self.finetuned else self.spec.head.features, gradient
        ).items():
            raw = np.einsum("bhwk,bk->bhw", maps[tap].astype(np.float64), weights)
            if parse_tap(tap).flip:
                raw = raw[:, :, ::-1]
            total += raw if raw.shape[1:] == self.grid else upsample(raw, self.grid)
        return total.astype(np.float32)


def _tap_gradients(
    taps: tuple[str, ...], features: str | None, gradient: np.ndarray
) -> dict[str, np.ndarray]:
    """dy/d(each tap's features) from dy/d(the head's input), by the choice's linear terms."""
    if features is None:  # a fine-tuned model: one pooled block 5
        return {taps[0]: gradient.astype(np.float64)}
    found = {tap: np.zeros((len(gradient), parse_tap(tap).dim)) for tap in taps}
    start = 0
    for term in parse_features(features):
        width = parse_tap(term.tap).dim
        part = gradient[:, start : start + width].astype(np.float64)
        for tap in term.taps:  # a _flipavg term is the mean of two taps: half to each
            found[tap] += part / len(term.taps)
        start += width
    return found


def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(n, h, w) maps resized bilinearly (Pillow, half-pixel centres) to (n, *size)."""
    height, width = size
    return np.stack(
        [
            np.asarray(
                Image.fromarray(np.asarray(m, np.float32), "F").resize(
                    (width, height), Image.Resampling.BILINEAR
                )
            )
            for m in maps
        ]
    ).reshape(len(maps), height, width)


def logits_gradient(
    fn: Callable[[Any], Any], x: np.ndarray, cotangent: Callable[[Any], np.ndarray]
) -> np.ndarray:
    """d(sum of cotangent(L) * L)/dx with L = fn(x): one forward and one backward pass.

    cotangent sees the logits L and returns the weights of each (constants, chosen from L).
    The one backend-specific function: TensorFlow's GradientTape, or JAX's vjp.
    """
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        inputs = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            logits = fn(inputs)
        weights = tf.convert_to_tensor(cotangent(logits), logits.dtype)
        return np.asarray(tape.gradient(logits, inputs, output_gradients=weights))
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        logits, backward = jax.vjp(fn, jnp.asarray(x))
        (gradient,) = backward(jnp.asarray(cotangent(logits), logits.dtype))
        return np.asarray(gradient)
    raise ValueError(
        f"class activation maps need the tensorflow or jax Keras backend, not {backend}"
    )


def _feature_extractor(scorer: Any) -> FeatureExtractor:
    extractor = scorer.extractor
    return extractor if isinstance(extractor, FeatureExtractor) else extractor.extractor


def _tapped_blocks(model: Any, taps: tuple[str, ...]) -> Any:
    """pixels -> {map_<tap>: the block output its pooling reads (float32), pool_<tap>: features}."""
    import keras

    outputs = {}
    for tap in taps:
        # The default gap5 extractor names its pooling avg_pool; a tapped one names it the tap.
        names = {layer.name for layer in model.layers}
        pool = model.get_layer(tap if tap in names else "avg_pool")
        outputs[f"map_{tap}"] = keras.layers.Activation(
            "linear", dtype="float32", name=f"map_{tap}"
        )(pool.input)
        outputs[f"pool_{tap}"] = keras.layers.Activation(
            "linear", dtype="float32", name=f"pool_{tap}"
        )(pool.output)
    return keras.Model(model.input, outputs, name="cam_blocks")


def _finetune_parts(model: Any) -> tuple[Any, Any]:
    """A fine-tuned model as (activation -> its block5_pool output and pooled features, head)."""
    import keras

    blocks = keras.Model(
        model.input,
        {
            "map_gap5": model.get_layer("block5_pool").output,
            "pool_gap5": model.get_layer("avg_pool").output,
        },
        name="cam_finetuned_blocks",
    )
    return blocks, model.get_layer("head")


def _logit_parts(head: Any) -> tuple[Any, Any]:
    """(head input -> the last Dense layer's input, that layer): its logits are exact from them."""
    import keras

    score = head.get_layer("score")
    return keras.Model(head.input, score.input, name="head_trunk"), score
