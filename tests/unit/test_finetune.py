"""Fine-tuning's compute on tiny activations: the two stages, the curves, the saved weights;
VGG19's four-convolution block 5 and its deployable model."""

import io
from pathlib import Path

import keras
import ml_dtypes
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from emotr.config import BackboneConfig, ConfigError, DecodeConfig
from emotr.config_io import load_config
from emotr.data.imageio import decode_image
from emotr.deploy.serving import ImageScorer, ServingSpec
from emotr.extract.backbone import FeatureExtractor, save_conv_base_weights
from emotr.hyperparams import HeadParams
from emotr.search.finetune import fit_finetune, predict_batched
from emotr.search.finetune_model import (
    ActivationInput,
    backbone_block_weights,
    build_finetune_model,
    trained_blocks,
)
from emotr.search.finetune_set import FineTuneSet
from emotr.search.gpus import EPOCH_SECONDS
from emotr.search.head import fit_head
from tests.conftest import SMOKE


def _finetune_set(n_train: int = 48, n_val: int = 24) -> FineTuneSet:
    """block4_pool-shaped (2, 2, 512) activations of a 32x32 input; class 1 is brighter."""
    rng = np.random.default_rng(0)
    n = n_train + n_val
    y = np.arange(n) % 2
    a = (
        np.abs(rng.normal(size=(n, 2, 2, 512))).astype(np.float32)
        * (1 + 0.3 * y)[:, None, None, None]
    )
    x = a.mean(axis=(1, 2))
    cfg = load_config([SMOKE])
    return FineTuneSet(
        x_train=x[:n_train], y_train=y[:n_train], x_val=x[n_train:], y_val=y[n_train:],
        fingerprint="f", split_digest="s", a_train=a[:n_train], a_val=a[n_train:],
        activation="block4_pool",
        block_weights=backbone_block_weights(cfg.backbone, "block4_pool"),
    )  # fmt: skip


def test_blocks_above_an_activation():
    assert trained_blocks("block4_pool") == (5,)
    assert trained_blocks("block3_pool") == (4, 5)


def test_finetuning_continues_the_fitted_head_and_never_ends_worse():
    data = _finetune_set()
    params = HeadParams(
        finetune=True, standardize=True, learning_rate=1e-3, finetune_epochs=3, early_stopping=True
    )
    result = fit_finetune(params, data, epochs=4, patience=4)
    first_joint = int(result.metrics["finetune_from_epoch"])
    assert first_joint == 5  # 4 head epochs (patience 4 never stops 4 epochs early)
    assert 0 < result.metrics[EPOCH_SECONDS] < result.train_seconds  # one joint epoch's cost
    assert all(len(curve) == first_joint - 1 + 3 for curve in result.history.values())
    head_only = max(result.history["val_auc"][: first_joint - 1])
    assert result.metrics["val_auc"] == pytest.approx(max(result.history["val_auc"]))
    assert result.metrics["val_auc"] >= head_only
    scores = predict_batched(result.model, data.a_val).reshape(-1)
    np.testing.assert_allclose(scores, result.val_proba[:, 1], atol=1e-6)


def test_without_early_stopping_every_epoch_trains_and_the_last_weights_are_kept():
    """early_stopping=false (the tutorial's procedure): all head epochs, all joint epochs."""
    data = _finetune_set()
    params = HeadParams(finetune=True, learning_rate=1e-3, finetune_epochs=3, finetune_patience=1)
    result = fit_finetune(params, data, epochs=3, patience=1)
    assert int(result.metrics["finetune_from_epoch"]) == 4
    assert all(len(curve) == 3 + 3 for curve in result.history.values())
    assert result.metrics["val_auc"] == pytest.approx(result.history["val_auc"][-1], abs=1e-6)


def test_the_fitted_head_is_where_joint_training_starts():
    """Before any joint step, the assembled model scores as the head does on pooled features."""
    data = _finetune_set()
    params = HeadParams(finetune=True, learning_rate=1e-3)
    pooled = build_finetune_model(HeadParams(n_layers=0), (2, 2, 512), "block4_pool")
    for name, weights in data.block_weights.items():
        pooled.get_layer(name).set_weights(weights)
    features = keras.Model(pooled.input, pooled.get_layer("avg_pool").output)
    g_train, g_val = predict_batched(features, data.a_train), predict_batched(features, data.a_val)
    head = fit_head(params, g_train, data.y_train, g_val, data.y_val, epochs=3, patience=3)
    model = build_finetune_model(params, (2, 2, 512), "block4_pool", g_train)
    for name, weights in data.block_weights.items():
        model.get_layer(name).set_weights(weights)
    model.get_layer("head").set_weights(head.model.get_weights())
    np.testing.assert_allclose(
        predict_batched(model, data.a_val).reshape(-1), head.val_proba[:, 1], atol=1e-5
    )


def test_saved_weights_rebuild_the_same_model(tmp_path: Path):
    """What serving does: build from the spec's params, load the trial's weights file."""
    data = _finetune_set()
    params = HeadParams(finetune=True, standardize=True, finetune_epochs=1, n_layers=2)
    result = fit_finetune(params, data, epochs=2, patience=2)
    path = tmp_path / "head.weights.h5"
    result.model.save_weights(str(path))
    rebuilt = build_finetune_model(params, (2, 2, 512), "block4_pool")
    rebuilt.load_weights(str(path))
    np.testing.assert_allclose(
        predict_batched(rebuilt, data.a_val).reshape(-1), result.val_proba[:, 1], atol=1e-6
    )


def test_finetune_without_a_cached_activation_is_refused():
    with pytest.raises(ConfigError, match=r"extract\.cache_activation"):
        load_config([SMOKE], ["tune.baseline.finetune=true"])
    space = "tune.search_space={finetune: {type: categorical, choices: [true, false]}}"
    with pytest.raises(ConfigError, match=r"extract\.cache_activation=block4_pool"):
        load_config([SMOKE], [space])
    cfg = load_config(
        [SMOKE], ["tune.baseline.finetune=true", "extract.cache_activation=block4_pool"]
    )
    assert cfg.tune.baseline.finetune


def test_finetune_params_are_validated():
    with pytest.raises(ConfigError, match="finetune_lr_scale"):
        load_config([SMOKE], ["tune.baseline.finetune_lr_scale=0"])


def test_serving_input_is_the_activation_as_cached():
    """The deployable model's frozen blocks give their output rounded to bfloat16, as cached."""
    cfg = load_config([SMOKE])
    pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    served = ActivationInput(cfg.backbone, "block4_pool", batch_size=2)
    served.batch_size = 4
    exact = FeatureExtractor(cfg.backbone, 4, outputs=("block4_pool",)).extract_outputs(pixels)
    rounded = exact["block4_pool"].astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(served(pixels), rounded)
    assert served(pixels).shape == (3, 2, 2, 512)


# The tutorial's backbone and input handling: VGG19 (block 5 has four convolutions), x / 255,
# nearest-neighbour resizing.
VGG19 = BackboneConfig(
    name="vgg19", weights="none", input_size=(32, 32), preprocess="rescale", precision="float32"
)
NEAREST = DecodeConfig(resize="nearest")


def _png(seed: int, brightness: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(brightness, 40, (40, 50, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def vgg19_images() -> tuple[list[bytes], np.ndarray, dict[str, np.ndarray]]:
    """24 PNGs (class 1 brighter), their labels and VGG19's block4_pool and gap5 of them."""
    labels = np.arange(24) % 2
    images = [_png(i, 90 + 60 * int(y)) for i, y in enumerate(labels)]
    pixels = np.stack([
        decode_image(image, VGG19.input_size, max_pixels=NEAREST.max_pixels, resize="nearest")
        for image in images
    ])  # fmt: skip
    outputs = ("block4_pool", "gap5")
    return images, labels, FeatureExtractor(VGG19, 8, outputs=outputs).extract_outputs(pixels)


def _vgg19_set(vgg19_images, n_train: int = 16) -> FineTuneSet:
    _, y, outputs = vgg19_images
    a = outputs["block4_pool"].astype(ml_dtypes.bfloat16)  # as the activation cache holds it
    x = outputs["gap5"]
    return FineTuneSet(
        x_train=x[:n_train], y_train=y[:n_train], x_val=x[n_train:], y_val=y[n_train:],
        fingerprint="f", split_digest="s", a_train=a[:n_train], a_val=a[n_train:],
        activation="block4_pool", block_weights=backbone_block_weights(VGG19, "block4_pool"),
        backbone=VGG19.name,
    )  # fmt: skip


def test_vgg19_block5_has_four_convolutions_with_the_backbones_weights(vgg19_images):
    weights = backbone_block_weights(VGG19, "block4_pool")
    assert list(weights) == [f"block5_conv{k}" for k in range(1, 5)]
    conv_base = FeatureExtractor(VGG19).model.get_layer("vgg19")
    for name, values in weights.items():
        for value, expected in zip(values, conv_base.get_layer(name).get_weights(), strict=True):
            np.testing.assert_array_equal(value, expected)
    assert len(backbone_block_weights(VGG19, "block3_pool")) == 8  # blocks 4 and 5
    # The fine-tuning model's block 5, given those weights, is VGG19's: its GAP is gap5.
    _, _, outputs = vgg19_images
    model = build_finetune_model(HeadParams(n_layers=0), (2, 2, 512), "block4_pool",
                                 backbone="vgg19")  # fmt: skip
    convs = [layer.name for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert convs == list(weights)
    for name, values in weights.items():
        model.get_layer(name).set_weights(values)
    pooled = keras.Model(model.input, model.get_layer("avg_pool").output)
    np.testing.assert_allclose(
        predict_batched(pooled, outputs["block4_pool"]), outputs["gap5"], atol=1e-4, rtol=1e-5
    )


def test_finetuning_vgg19_runs_and_serves_the_trials_probabilities(vgg19_images, tmp_path: Path):
    """fit_finetune on VGG19's activations, then the deployable model rebuilt from its weight
    files (emotr.deploy.serving, as a registered version is) scores images as the trial did."""
    data = _vgg19_set(vgg19_images)
    params = HeadParams(finetune=True, learning_rate=1e-3, finetune_epochs=2, units=16)
    result = fit_finetune(params, data, epochs=3, patience=3)
    assert len(result.history["val_auc"]) > int(result.metrics["finetune_from_epoch"]) - 1
    convs = [layer.name for layer in result.model.layers if layer.name.startswith("block5_conv")]
    assert convs == [f"block5_conv{k}" for k in range(1, 5)]

    head_file, backbone_file = tmp_path / "head.weights.h5", tmp_path / "backbone.weights.h5"
    result.model.save_weights(str(head_file))
    save_conv_base_weights(VGG19, backbone_file)
    spec = ServingSpec(
        backbone=VGG19, decode=NEAREST, head=params, n_features=512, classes=("no", "yes"),
        activation="block4_pool",
    )  # fmt: skip
    scorer = ImageScorer(spec, backbone_file, head_file)
    images, _, _ = vgg19_images
    rows = scorer.score(pd.DataFrame({"image": images[16:]}))
    assert rows["error"].isna().all()
    np.testing.assert_allclose(rows["p_yes"].to_numpy(float), result.val_proba[:, 1], atol=1e-4)
