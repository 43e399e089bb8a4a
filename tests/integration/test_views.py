"""Augmented views (extract.views) through the real Ray pipeline: real images, smoke config."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from emotr.cache.maintenance import list_caches, verify_cache
from emotr.cache.views import load_views
from emotr.data.augment import augmented_views
from emotr.data.listing import list_images
from emotr.extract.backbone import FeatureExtractor
from emotr.extract.driver import extract_features
from tests.conftest import decoded, demo_config
from tests.integration.test_taps import close, part_files, tap_cache

pytestmark = pytest.mark.slow

TAPS = "extract.taps=[gap5,gap4,gap5_flip]"


def rows_by_folder(root: str) -> dict[str, int]:
    return {info.holds: info.n_rows for info in list_caches(root)}


def test_raising_the_views_extracts_only_the_new_view_and_a_rerun_makes_the_same(
    tmp_path, ray_local, caplog
):
    cfg = demo_config(tmp_path, TAPS, "extract.views=2")
    listing = list_images(cfg.data)
    keys = listing.images["sha256"].tolist()
    first = extract_features(cfg, listing, progress=False)
    assert first.n_extracted == 24
    # One plain pass, one of the mirror image (gap5_flip), one per view.
    assert first.n_passes == 4 and "gap5_view2" in first.outputs
    assert rows_by_folder(cfg.cache.root) == {
        "gap5": 24,
        "gap4": 24,
        "gap5_flip": 24,
        "gap5_view1": 24,
        "gap4_view1": 24,
        "gap5_view2": 24,
        "gap4_view2": 24,
    }
    before = load_views(cfg.cache.root, first.fingerprint, "gap5", 2, keys)
    untouched = {tap: part_files(tap_cache(cfg, tap)) for tap in ("gap5", "gap4", "gap5_flip")}

    three = demo_config(tmp_path, TAPS, "extract.views=3")
    with caplog.at_level(logging.INFO, logger="emotr.extract.driver"):
        summary = extract_features(three, listing, progress=False)
    # Only view 3 ran: one pass per image, and no folder but view 3's gained a row.
    assert (summary.outputs, summary.n_passes) == (("gap5_view3", "gap4_view3"), 1)
    assert (summary.n_extracted, summary.n_cached) == (24, 0)
    assert summary.fingerprint == first.fingerprint
    assert sum(summary.rows_per_worker.values()) == 24
    assert any("(passes of the conv base per image: 1)" in r.getMessage() for r in caplog.records)
    rows = rows_by_folder(cfg.cache.root)
    assert rows["gap5_view3"] == rows["gap4_view3"] == 24 and len(rows) == 9
    assert {tap: part_files(tap_cache(cfg, tap)) for tap in untouched} == untouched
    views = load_views(cfg.cache.root, first.fingerprint, "gap5", 3, keys)
    assert views.shape == (24, 3, 512) and views.dtype == np.float32
    np.testing.assert_array_equal(views[:, :2], before)
    assert verify_cache(cfg.cache.root) == []

    again = extract_features(three, listing, progress=False)
    assert (again.n_extracted, again.n_actors, again.outputs) == (0, 0, ())

    # The cached view is the plain model's features of the documented augmentation.
    pixels = decoded(cfg, listing.images["path"])
    gap5 = FeatureExtractor(cfg.backbone)(augmented_views(pixels, keys, 3))
    assert close(views[:, 2], gap5)
    assert not close(views[:, 2], views[:, 1])

    # A fresh cache elsewhere, all three views at once: the same views (seeded by the bytes).
    fresh = demo_config(tmp_path, TAPS, "extract.views=3", f"cache.root={tmp_path / 'fresh'}")
    assert extract_features(fresh, listing, progress=False).n_passes == 5
    remade = load_views(fresh.cache.root, first.fingerprint, "gap4", 3, keys[::-1])
    assert close(remade[::-1], load_views(cfg.cache.root, first.fingerprint, "gap4", 3, keys))
