"""Augmented views (extract.views): the seeded augmentation, the views' folders, their loader and
the extractor's view passes, without Ray."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from emotr.cache.fingerprint import CacheKey, fingerprint_of, tap_inputs, view_inputs
from emotr.cache.maintenance import list_caches
from emotr.cache.sets import open_cache_set
from emotr.cache.store import FeatureCache
from emotr.cache.views import ViewsMissing, load_views, open_view, view_fingerprint
from emotr.config import ConfigError
from emotr.config_io import load_config
from emotr.data.augment import (
    AUGMENTATION,
    BRIGHTNESS,
    CROP_AREA,
    SATURATION,
    augmented_view,
    augmented_views,
    view_params,
)
from emotr.extract.backbone import FeatureExtractor
from emotr.taps import conv_passes, parse_view_output, view_output, view_outputs

INPUTS = {"backbone": "vgg16", "input_size": "32x32", "cache_format": "1"}
SHA = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(40)]


def image(seed: int = 0, size: tuple[int, int] = (48, 64)) -> np.ndarray:
    """A smooth picture with structure (a gradient and a bright square), not noise."""
    height, width = size
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (height + width)], -1)
    pixels[height // 4 : height // 2, width // 3 : width // 2] = 230 - seed
    return pixels.astype(np.uint8)


def test_a_view_is_the_same_for_the_same_bytes_and_number_on_every_call():
    pixels = image()
    first = augmented_view(pixels, SHA[0], 1)
    assert first.shape == pixels.shape and first.dtype == np.uint8
    np.testing.assert_array_equal(augmented_view(pixels.copy(), SHA[0], 1), first)
    # A batch gives each image the view it gets alone.
    batch = augmented_views(np.stack([image(1), pixels]), [SHA[1], SHA[0]], 1)
    np.testing.assert_array_equal(batch[1], first)
    assert not np.array_equal(first, pixels)  # it is a different picture of the image


def test_views_differ_across_numbers_and_images():
    pixels = image()
    by_number = [augmented_view(pixels, SHA[0], k) for k in range(1, 5)]
    by_image = [augmented_view(pixels, key, 1) for key in SHA[:4]]
    for views in (by_number, by_image):
        assert len({view.tobytes() for view in views}) == len(views)


def test_the_draws_stay_within_the_documented_ranges():
    draws = [view_params(key, k, 48, 64) for key in SHA for k in (1, 2, 3)]
    for draw in draws:
        x0, y0, x1, y1 = draw.box
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 48
        assert CROP_AREA[0] - 1e-9 <= (x1 - x0) * (y1 - y0) / (48 * 64) <= 1
        assert abs(draw.brightness - 1) <= BRIGHTNESS and abs(draw.saturation - 1) <= SATURATION
    assert 0.3 < np.mean([draw.flip for draw in draws]) < 0.7
    # Pinned: the seeding (sha256 of "<sha256>:<k>", four bytes a number) must not drift, or
    # cached views would no longer be what a re-run makes; change AUGMENT_VERSION with it.
    pinned = view_params("0" * 64, 1, 224, 224)
    assert pinned.flip and np.allclose(pinned.box, (44.18295, 11.43180, 210.00135, 193.02763))
    assert np.allclose([pinned.brightness, pinned.contrast], [0.882814, 1.038596])


def test_view_outputs_are_of_unflipped_taps_and_count_as_passes():
    assert view_outputs(["gap5", "gap4", "gap5_flip"], 2) == (
        "gap5_view1",
        "gap4_view1",
        "gap5_view2",
        "gap4_view2",
    )
    assert parse_view_output("gap4_view12") == ("gap4", 12) and parse_view_output("gap5") is None
    with pytest.raises(ValueError, match="unflipped"):
        view_output("gap5_flip", 1)
    assert conv_passes(["gap5", "gap5_flip", "gap5_view1", "gap4_view1", "gap5_view2"]) == 4
    assert conv_passes(["gap5_view3"]) == 1
    with pytest.raises(ConfigError, match=r"extract.views: .*less than or equal to 64"):
        load_config([], ["extract.views=65"])


def test_each_view_of_each_tap_has_its_own_folder_naming_the_augmentation():
    views = {view_fingerprint(INPUTS, tap, k) for tap in ("gap5", "gap4") for k in (1, 2)}
    taps = {fingerprint_of(INPUTS), fingerprint_of(tap_inputs(INPUTS, "gap4"))}
    assert len(views) == 4 and not views & taps
    inputs = view_inputs(INPUTS, "gap5", 2)
    assert inputs["view"] == "2" and inputs["augmentation"] == AUGMENTATION
    assert inputs["tap"] == "gap5" and inputs["feature_dim"] == "512"


def commit_views(root: str, fingerprint: str, keys: list[str], k: int, tap: str = "gap5") -> None:
    cache = open_view(root, fingerprint, INPUTS, tap, k)
    values = np.stack([np.full(512, i + 100 * k, np.float32) for i in range(len(keys))])
    cache.commit(keys, values, [48] * len(keys), [64] * len(keys))


def test_load_views_stacks_them_in_the_asked_order_and_names_the_key_when_some_miss(tmp_path):
    root, fingerprint = str(tmp_path / "cache"), fingerprint_of(INPUTS)
    # gap5's own folder: its fingerprint.json holds the inputs the views' folders derive from.
    FeatureCache(root, fingerprint, INPUTS).commit(SHA[:3], np.zeros((3, 512)), [1] * 3, [1] * 3)
    for k in (1, 2):
        commit_views(root, fingerprint, SHA[:3], k)
    got = load_views(root, fingerprint, "gap5", 2, [SHA[2], SHA[0]])
    assert got.shape == (2, 2, 512) and got.dtype == np.float32
    assert got[:, :, 0].tolist() == [[102, 202], [100, 200]]
    assert load_views(root, fingerprint, "gap5", 1, []).shape == (0, 1, 512)
    with pytest.raises(ViewsMissing, match=r"view 3 of gap5 .*extract.views: 3"):
        load_views(root, fingerprint, "gap5", 3, SHA[:2])
    with pytest.raises(ViewsMissing, match=r"extract.views: 1"):
        load_views(root, fingerprint, "gap5", 1, [SHA[5]])
    holds = sorted(info.holds for info in list_caches(root))
    assert holds == ["gap5", "gap5_view1", "gap5_view2"]


def test_raising_the_views_asks_only_for_the_new_ones(tmp_path):
    key = CacheKey(str(tmp_path / "cache"), fingerprint_of(INPUTS), INPUTS)
    taps = ("gap5", "gap4", "gap5_flip")
    two = open_cache_set(key, taps, None, (32, 32), n_views=2)
    assert set(two.caches) == {*taps, "gap5_view1", "gap4_view1", "gap5_view2", "gap4_view2"}
    for cache in two.caches.values():
        cache.commit(SHA[:4], np.ones((4, 512), np.float32), [48] * 4, [64] * 4)
    assert two.missing_outputs(SHA[:4]) == []
    three = open_cache_set(key, taps, None, (32, 32), n_views=3)
    assert three.missing_outputs(SHA[:4]) == ["gap5_view3", "gap4_view3"]
    assert len(three.complete_hashes()) == 0 and len(two.complete_hashes()) == 4


def test_the_extractor_computes_a_view_as_the_plain_model_computes_the_augmented_pixels():
    cfg = load_config([], ["backbone.weights=none", "backbone.input_size=[32,32]"]).backbone
    pixels = np.stack([image(i, (32, 32)) for i in range(3)])
    outputs = ("gap5", "gap5_flip", "gap5_view1", "gap4_view1", "gap5_view2")
    got = FeatureExtractor(cfg, batch_size=4, outputs=outputs).extract_outputs(pixels, SHA[:3])
    plain = FeatureExtractor(cfg, batch_size=4, outputs=("gap5", "gap4"))
    for k, tap in [(1, "gap5"), (1, "gap4"), (2, "gap5")]:
        expected = plain.extract_outputs(augmented_views(pixels, SHA[:3], k))[tap]
        np.testing.assert_allclose(got[f"{tap}_view{k}"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["gap5"], plain.extract_outputs(pixels)["gap5"], 1e-5, 1e-6)
    with pytest.raises(ValueError, match="seeded by the images' sha256s"):
        FeatureExtractor(cfg, batch_size=4, outputs=("gap5_view1",)).extract_outputs(pixels)
