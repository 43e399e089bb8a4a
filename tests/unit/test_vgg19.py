"""backbone.name=vgg19 (the tutorial's backbone) with both preprocessings and both resize filters:
emotr's extractor against keras.applications.VGG19 built here, weight files, the HED refusal."""

from __future__ import annotations

import io
import os
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from emotr.config import BackboneConfig, ConfigError, DecodeConfig
from emotr.config_io import load_config
from emotr.data.imageio import decode_image
from emotr.extract.backbone import FeatureExtractor, build_extractor
from emotr.extract.weights import WeightsUnavailable, build_conv_base, weights_identity

keras = pytest.importorskip("keras")

SIZE = (64, 64)  # block5_pool is 2x2: its average and its maximum differ
OUTPUTS = ("gap5", "gap4", "gmp5", "gap5_flip", "block4_pool")


def vgg19(preprocess: str = "caffe", weights: str = "none") -> BackboneConfig:
    return BackboneConfig(
        name="vgg19", weights=weights, input_size=SIZE, preprocess=preprocess, precision="float32"
    )


def photo(width: int = 90, height: int = 70) -> bytes:
    """A PNG with smooth gradients and noise: nearest and bilinear give different pixels."""
    rng = np.random.default_rng(4)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    noisy = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def extractors() -> dict[str, FeatureExtractor]:
    """emotr's tapped VGG19 extractor, by backbone.preprocess."""
    return {mode: FeatureExtractor(vgg19(mode), batch_size=4, outputs=OUTPUTS) for mode in
            ("caffe", "rescale")}  # fmt: skip


@pytest.fixture(scope="module")
def reference(extractors) -> keras.Model:
    """keras.applications.VGG19 built directly, emotr's weights copied in: its block4/5 pools."""
    direct = keras.applications.VGG19(include_top=False, weights=None, input_shape=(*SIZE, 3))
    blocks = extractors["caffe"].model.get_layer("blocks")
    for layer in direct.layers:
        if layer.weights:
            layer.set_weights(blocks.get_layer(layer.name).get_weights())
    layers = ["block4_pool", "block5_pool"]
    return keras.Model(direct.input, [direct.get_layer(name).output for name in layers])


def keras_inputs(pixels: np.ndarray, preprocess: str) -> np.ndarray:
    """What the tutorial (rescale) or Keras' own preprocess_input (caffe) feeds VGG19."""
    values = pixels.astype(np.float32)
    if preprocess == "rescale":
        return values / 255.0
    return keras.applications.vgg19.preprocess_input(values)


@pytest.mark.parametrize("resize", ["bilinear", "nearest"])
@pytest.mark.parametrize("preprocess", ["caffe", "rescale"])
def test_vgg19_taps_equal_keras_vgg19(extractors, reference, preprocess, resize):
    decode = DecodeConfig(resize=resize)
    data = [photo(), photo(50, 120)]
    pixels = np.stack([
        decode_image(blob, SIZE, max_pixels=decode.max_pixels, resize=decode.resize)
        for blob in data
    ])  # fmt: skip
    filters = {"bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST}
    for blob, decoded in zip(data, pixels, strict=True):
        expected = Image.open(io.BytesIO(blob)).convert("RGB").resize(SIZE[::-1], filters[resize])
        np.testing.assert_array_equal(decoded, np.asarray(expected))

    got = extractors[preprocess].extract_outputs(pixels)
    inputs = keras_inputs(pixels, preprocess)
    block4, block5 = (keras.ops.convert_to_numpy(v) for v in reference(inputs))
    _, block5_mirrored = (keras.ops.convert_to_numpy(v) for v in reference(inputs[:, :, ::-1]))
    expected = {
        "gap5": block5.mean(axis=(1, 2)),
        "gap4": block4.mean(axis=(1, 2)),
        "gmp5": block5.max(axis=(1, 2)),
        "gap5_flip": block5_mirrored.mean(axis=(1, 2)),
        "block4_pool": block4,
    }
    for name, value in expected.items():
        assert np.abs(value).max() > 1e-3, name  # random weights that still carry a signal
        np.testing.assert_allclose(got[name], value, atol=1e-4, rtol=1e-5, err_msg=name)
    assert not np.allclose(got["gap5"], got["gmp5"])


def test_the_plain_vgg19_extractor_is_gap5_of_the_tapped_one(extractors):
    pixels = np.random.default_rng(1).integers(0, 256, (3, *SIZE, 3), dtype=np.uint8)
    plain = FeatureExtractor(vgg19("rescale"), batch_size=4)
    assert plain.model.get_layer("vgg19").get_layer("block5_conv4") is not None
    np.testing.assert_allclose(
        plain(pixels), extractors["rescale"].extract_outputs(pixels)["gap5"], atol=1e-5
    )


def test_the_two_preprocessings_give_different_features(extractors):
    pixels = np.random.default_rng(2).integers(0, 256, (2, *SIZE, 3), dtype=np.uint8)
    caffe, rescale = (extractors[mode](pixels) for mode in ("caffe", "rescale"))
    assert not np.allclose(caffe, rescale, atol=1e-3)


def test_vgg19_weights_file_round_trips_and_a_vgg16_file_is_refused(extractors, tmp_path):
    path = tmp_path / "vgg19_notop.weights.h5"
    build_conv_base(vgg19()).save_weights(path)
    pixels = np.random.default_rng(3).integers(0, 256, (2, *SIZE, 3), dtype=np.uint8)
    loaded = FeatureExtractor(vgg19(weights=str(path)), batch_size=4)
    expected = extractors["caffe"].extract_outputs(pixels)["gap5"]
    np.testing.assert_allclose(loaded(pixels), expected, atol=1e-5)
    vgg16_file = tmp_path / "vgg16_notop.weights.h5"
    build_conv_base(
        BackboneConfig(weights="none", input_size=SIZE, precision="float32")
    ).save_weights(vgg16_file)
    with pytest.raises(WeightsUnavailable, match=r"VGG19.*backbone\.name=vgg19"):
        build_extractor(vgg19(weights=str(vgg16_file)))


def test_hed_weights_with_vgg19_fail_at_config_load_naming_both_keys():
    with pytest.raises(ConfigError) as caught:
        load_config([], ["backbone.name=vgg19", "backbone.weights=hed-bsds500"])
    message = str(caught.value)
    assert "backbone.name=vgg19" in message and "backbone.weights=hed-bsds500" in message
    assert (
        load_config([], ["backbone.name=vgg19", "backbone.weights=none"]).backbone.name == "vgg19"
    )
    # A BackboneConfig built in code, past the config's check, is refused by the builder.
    with pytest.raises(WeightsUnavailable, match=r"backbone\.name=vgg19"):
        build_conv_base(vgg19(weights="hed-bsds500"))


def test_vgg19_has_its_own_weight_identity():
    assert weights_identity(vgg19(weights="imagenet")) == (
        "imagenet:vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"
    )
    assert weights_identity(BackboneConfig(weights="imagenet", precision="float32")) == (
        "imagenet:vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    )


def _imagenet_vgg19_cached() -> bool:
    home = Path(os.environ.get("KERAS_HOME", "~/.keras")).expanduser()
    return (home / "models" / "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5").is_file()


@pytest.mark.skipif(_imagenet_vgg19_cached(), reason="ImageNet VGG19 weights are cached here")
def test_vgg19_imagenet_offline_names_alternatives_without_hed(monkeypatch):
    def offline(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (tests are offline)")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    with pytest.raises(WeightsUnavailable) as caught:
        build_extractor(vgg19(weights="imagenet"))
    message = str(caught.value)
    assert "ImageNet VGG19" in message and "backbone.weights=none" in message
    assert "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert "hed-bsds500" not in message
