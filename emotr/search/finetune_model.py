"""The model of deep fine-tuning: the backbone's blocks above a cached activation, GAP, the head.

Built by the trials that fine-tune (emotr.search.finetune) and by the deployable model
(emotr.deploy.serving), which runs the frozen blocks on pixels, rounds their output to the
cache's dtype (what the trial trained on), then this model. No training data code here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import ml_dtypes
import numpy as np

from emotr.cache.activations import STORED_DTYPE
from emotr.config import BackboneConfig
from emotr.extract.backbone import FeatureExtractor, OnExtractor, build_extractor
from emotr.extract.weights import BLOCK_CONVS, conv_layers
from emotr.hyperparams import HeadParams
from emotr.search.head import build_head
from emotr.taps import activation_shape

# VGG's blocks 4 and 5: three (VGG16) or four (VGG19) 3x3 convolutions of 512 filters, then a
# 2x2 max pool.
FILTERS = 512
_TOP_BLOCK = 5


def trained_blocks(activation: str) -> tuple[int, ...]:
    """The blocks above a cached activation: block4_pool -> (5,), block3_pool -> (4, 5)."""
    block = int(activation.removeprefix("block").removesuffix("_pool"))
    return tuple(range(block + 1, _TOP_BLOCK + 1))


def backbone_block_weights(cfg: BackboneConfig, activation: str) -> dict[str, list[np.ndarray]]:
    """The configured backbone's weights of the convolutions above `activation`, by layer."""
    # float32 build: a bfloat16 policy clone holds the same float32 variables anyway.
    model = build_extractor(cfg.model_copy(update={"precision": "float32"}))
    (conv_base,) = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    return {
        name: conv_base.get_layer(name).get_weights()
        for name in conv_layers(cfg.name, trained_blocks(activation))
    }


def build_finetune_model(
    params: HeadParams,
    activation_shape: Sequence[int],
    activation: str,
    x_adapt: np.ndarray | None = None,
    backbone: str = "vgg16",
    n_classes: int = 2,
) -> keras.Model:
    """(B, h, w, c) activation -> the blocks above it of `backbone` (backbone.name: vgg16 |
    vgg19) -> GAP -> the head of n_classes (a nested model).

    x_adapt: pooled features the head's Normalization adapts to (params.standardize).
    """
    inputs = keras.Input(tuple(activation_shape), name="activation")
    hidden = inputs
    for block in trained_blocks(activation):
        for k in range(1, BLOCK_CONVS[backbone][block] + 1):
            conv = keras.layers.Conv2D(
                FILTERS, 3, padding="same", activation="relu", name=f"block{block}_conv{k}"
            )
            hidden = conv(hidden)
        hidden = keras.layers.MaxPooling2D(2, strides=2, name=f"block{block}_pool")(hidden)
    pooled = keras.layers.GlobalAveragePooling2D(name="avg_pool")(hidden)
    if params.standardize and x_adapt is None:
        x_adapt = np.zeros((2, FILTERS), dtype=np.float32)  # load_weights replaces its stats
    head = build_head(params, FILTERS, x_adapt, n_classes)
    return keras.Model(inputs, head(pooled), name="finetune")


class ActivationInput(OnExtractor):
    """Pixels -> the cached activation as the trial saw it: the frozen blocks, rounded to the
    cache's dtype, as float32. The input side of a deployable fine-tuned model."""

    def __init__(self, cfg: BackboneConfig, activation: str, batch_size: int):
        self.activation = activation
        self.extractor = FeatureExtractor(cfg, batch_size=batch_size, outputs=(activation,))

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 -> (B, h, w, c) float32 activations."""
        maps = self.extractor.extract_outputs(pixels)[self.activation]
        return maps.astype(getattr(ml_dtypes, STORED_DTYPE)).astype(np.float32)


def serving_parts(
    head: HeadParams,
    backbone: BackboneConfig,
    activation: str,
    batch_size: int,
    n_classes: int = 2,
) -> tuple[Any, keras.Model]:
    """(pixels -> activation, activation -> probabilities) of a deployable fine-tuned model; the
    caller loads the trained weights into the second."""
    shape = activation_shape(activation, backbone.input_size)
    model = build_finetune_model(
        head, shape, activation, backbone=backbone.name, n_classes=n_classes
    )
    return ActivationInput(backbone, activation, batch_size), model
