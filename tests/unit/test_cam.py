"""Class activation maps (emotr.insight.cam) against the definitions computed independently:
CAM (sum_k w_k A_k) for a linear head, Grad-CAM by GradientTape through the whole model else."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from emotr.config import BackboneConfig, DecodeConfig
from emotr.deploy.serving import ImageScorer, ServingSpec
from emotr.extract.backbone import save_conv_base_weights
from emotr.extract.weights import build_conv_base
from emotr.hyperparams import HeadParams
from emotr.insight.cam import CamModel, map_grid
from emotr.insight.overlay import heatmap, overlay
from emotr.search.finetune_model import build_finetune_model
from emotr.search.head import build_head
from emotr.taps import activation_shape, features_dim

BACKBONE = BackboneConfig(weights="none", input_size=(64, 64), precision="float32")
TOLERANCE = 1e-5  # of the map's largest magnitude


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cam")
    save_conv_base_weights(BACKBONE, path / "backbone.weights.h5")
    return path


@pytest.fixture(scope="module")
def conv_base():
    """The conv base with the scorer's weights (seeded), run here without emotr's graphs."""
    return build_conv_base(BACKBONE)


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)


def make_scorer(
    folder: Path, params: HeadParams, classes, pixels: np.ndarray, activation: str | None = None
):
    """An ImageScorer rebuilt from weight files of a seeded random head, as a registry loads it."""
    keras.utils.set_random_seed(len(classes) + params.n_layers)
    n_features = features_dim(params.features)
    x_adapt = np.random.default_rng(0).gamma(1.0, 1.0, (32, n_features)).astype(np.float32)
    if activation:
        shape = activation_shape(activation, BACKBONE.input_size)
        head = build_finetune_model(
            params, shape, activation, x_adapt[:, :512], n_classes=len(classes)
        )
        n_features = 512
    else:
        head = build_head(params, n_features, x_adapt, len(classes))
    name = f"head_{params.n_layers}_{len(classes)}_{params.features}_{activation}.weights.h5"
    head.save_weights(str(folder / name))
    spec = ServingSpec(
        backbone=BACKBONE,
        decode=DecodeConfig(),
        head=params,
        n_features=n_features,
        classes=tuple(classes),
        activation=activation,
    )
    scorer = ImageScorer(spec, folder / "backbone.weights.h5", folder / name)
    center_bias(scorer, pixels)
    return scorer


def center_bias(scorer, pixels: np.ndarray) -> None:
    """Set the output bias so that each logit's median over `pixels` is 0: both (or several)
    classes are then predicted among a few random images."""
    inputs = scorer.extractor(pixels)
    model = scorer.head
    if scorer.spec.activation:
        inputs = keras.Model(model.input, model.get_layer("avg_pool").output)(inputs)
        model = model.get_layer("head")
    score = model.get_layer("score")
    kernel, _ = score.get_weights()
    logits = keras.Model(model.input, score.input)(inputs).numpy() @ kernel
    score.set_weights([kernel, -np.median(logits, axis=0).astype(np.float32)])


def preprocessed(pixels: np.ndarray) -> tf.Tensor:
    return tf.convert_to_tensor(
        keras.applications.vgg16.preprocess_input(pixels.astype(np.float32))
    )


def logits_head(head):
    """The head's logits: the head itself called with its output layer's activation off."""
    score = head.get_layer("score")

    def logits(features):
        activation, score.activation = score.activation, keras.activations.linear
        try:
            return head(features, training=False)
        finally:
            score.activation = activation

    return logits


def selected(logits: tf.Tensor, predicted: np.ndarray) -> tf.Tensor:
    """y: z or -z (sigmoid), else the predicted class's logit."""
    if logits.shape[1] == 1:
        return tf.where(predicted == 1, logits[:, 0], -logits[:, 0])
    return tf.gather(logits, predicted, axis=1, batch_dims=1)


def grad_cam(conv_base, head, pixels, predicted, layers=("block5_pool",), flip=False) -> np.ndarray:
    """Grad-CAM through the whole model: alpha_k = sum_ij dy/dA_ij^k, M = sum_k alpha_k A_k of
    each block (mirror maps mirrored back), summed on the finest block's grid. With two blocks,
    dy/dA of each is the partial derivative through its own pooled slice (what the head reads)."""
    blocks = keras.Model(conv_base.input, [conv_base.get_layer(n).output for n in layers])
    logits_of = logits_head(head)
    inputs = preprocessed(pixels)
    maps = list(blocks(inputs)) if len(layers) > 1 else [blocks(inputs)]
    if flip:
        maps.append(blocks(tf.reverse(inputs, axis=[2])))
    # Each block's own slice of the head's input: dy/dA4 without the path through block 5.
    maps = [tf.constant(a) for a in maps]
    with tf.GradientTape() as tape:
        tape.watch(maps)
        pooled = [tf.reduce_mean(a, axis=(1, 2)) for a in maps]
        features = (pooled[0] + pooled[1]) / 2 if flip else tf.concat(pooled, axis=1)
        y = selected(logits_of(features), predicted)
    gradients = tape.gradient(y, maps)
    finest = max(a.shape[1] for a in maps)
    total = 0
    for index, (a, g) in enumerate(zip(maps, gradients, strict=True)):
        raw = tf.einsum("bhwk,bk->bhw", a, tf.reduce_sum(g, axis=(1, 2))).numpy()
        if flip and index == 1:
            raw = raw[:, :, ::-1]
        if raw.shape[1] != finest:
            raw = tf.image.resize(raw[..., None], (finest, finest), "bilinear").numpy()[..., 0]
        total = total + raw
    return total


def assert_maps_equal(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    scale = np.abs(expected).max()
    assert scale > 0
    assert np.abs(actual - expected).max() <= TOLERANCE * scale


def test_linear_head_map_is_the_cam_of_the_block5_output(folder, conv_base, pixels):
    scorer = make_scorer(folder, HeadParams(n_layers=0, standardize=False), ("neg", "pos"), pixels)
    result = CamModel(scorer, batch_size=4).explain(pixels)  # two chunks: 4 + 2

    a = conv_base(preprocessed(pixels)).numpy()  # block5_pool: (6, 2, 2, 512)
    kernel, bias = scorer.head.get_layer("score").get_weights()
    sign = np.where(result.predicted == 1, 1.0, -1.0)
    expected = sign[:, None, None] * np.einsum("bhwk,k->bhw", a, kernel[:, 0])
    assert_maps_equal(result.maps, expected)
    # Zhou et al.'s identity: the map's mean is the chosen logit minus its bias.
    logit = a.mean(axis=(1, 2)) @ kernel[:, 0] + bias[0]
    np.testing.assert_allclose(
        result.maps.mean(axis=(1, 2)), sign * (logit - bias[0]), rtol=1e-4, atol=1e-6
    )
    served = scorer.score_features(scorer.extractor(pixels))
    np.testing.assert_allclose(result.proba, served, atol=1e-6)
    assert set(result.predicted) == {0, 1}
    assert map_grid(scorer.spec) == (2, 2)


@pytest.mark.parametrize("classes", [("neg", "pos"), ("a", "b", "c", "d")])
def test_hidden_layer_head_map_is_grad_cam_through_the_whole_model(
    folder, conv_base, pixels, classes
):
    params = HeadParams(n_layers=2, units=16, standardize=True, dropout=0.3)
    scorer = make_scorer(folder, params, classes, pixels)
    result = CamModel(scorer).explain(pixels)

    expected = grad_cam(conv_base, scorer.head, pixels, result.predicted)
    assert_maps_equal(result.maps, expected)
    np.testing.assert_allclose(
        result.proba, scorer.score_features(scorer.extractor(pixels)), atol=1e-6
    )
    assert result.proba.shape == (6, len(classes))
    assert len(set(result.predicted)) >= 2


def test_two_blocks_sum_their_maps_on_the_finer_grid(folder, conv_base, pixels):
    params = HeadParams(n_layers=1, units=16, standardize=True, features="gap4+gap5")
    scorer = make_scorer(folder, params, ("neg", "pos"), pixels)
    result = CamModel(scorer).explain(pixels)

    expected = grad_cam(
        conv_base, scorer.head, pixels, result.predicted, ("block4_pool", "block5_pool")
    )
    assert result.maps.shape == (6, 4, 4)
    assert_maps_equal(result.maps, expected)


def test_a_flip_average_mirrors_the_mirror_images_map_back(folder, conv_base, pixels):
    params = HeadParams(n_layers=1, units=16, standardize=True, features="gap5_flipavg")
    scorer = make_scorer(folder, params, ("neg", "pos"), pixels)
    result = CamModel(scorer).explain(pixels)

    expected = grad_cam(conv_base, scorer.head, pixels, result.predicted, flip=True)
    assert_maps_equal(result.maps, expected)


def test_a_fine_tuned_model_maps_its_own_block5(folder, pixels):
    params = HeadParams(n_layers=1, units=16, standardize=True)
    scorer = make_scorer(folder, params, ("neg", "pos"), pixels, activation="block4_pool")
    result = CamModel(scorer).explain(pixels)

    activations = tf.convert_to_tensor(scorer.extractor(pixels))  # as served: rounded to bf16
    model = scorer.head
    block5 = keras.Model(model.input, model.get_layer("block5_pool").output)
    logits_of = logits_head(model.get_layer("head"))
    with tf.GradientTape() as tape:
        a = block5(activations)
        tape.watch(a)
        y = selected(logits_of(tf.reduce_mean(a, axis=(1, 2))), result.predicted)
    alpha = tf.reduce_sum(tape.gradient(y, a), axis=(1, 2))
    expected = tf.einsum("bhwk,bk->bhw", a, alpha).numpy()
    assert_maps_equal(result.maps, expected)
    np.testing.assert_allclose(
        result.proba, scorer.score_features(scorer.extractor(pixels)), atol=1e-6
    )


def test_the_overlay_shows_where_the_map_is_high():
    raw = np.array([[0.0, -3.0], [0.0, 2.0]], np.float32)  # negative evidence: ReLU drops it
    heat = heatmap(raw, (40, 60))
    assert heat.shape == (40, 60) and heat.min() >= 0 and heat.max() == pytest.approx(1.0, abs=1e-6)
    assert heat[35, 55] > 0.9 and heat[5, 5] < 0.1 and heat[5, 55] < 0.1
    image = np.full((40, 60, 3), 128, np.uint8)
    shown = overlay(image, raw, alpha=0.5)
    assert shown.shape == image.shape and shown.dtype == np.uint8
    assert not np.array_equal(shown[35, 55], shown[5, 5])
    assert np.array_equal(overlay(image, raw, alpha=0.0), image)
    assert heatmap(np.zeros((2, 2), np.float32), (4, 4)).max() == 0  # no evidence: no heat
