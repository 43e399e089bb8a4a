"""Feature taps and cached activations through the real Ray pipeline: real images, smoke config."""

from __future__ import annotations

from pathlib import Path

import mlflow.keras
import numpy as np
import pandas as pd
import pytest

from emotr import pipeline
from emotr.cache.activations import ActivationsMissing
from emotr.cache.maintenance import compact_cache, list_caches, verify_cache
from emotr.cache.store import FeatureCache, open_tap
from emotr.config import Config
from emotr.data.listing import list_images
from emotr.deploy.registry import get_version, load_model, load_validation_set
from emotr.extract.backbone import FeatureExtractor
from emotr.extract.driver import extract_features
from emotr.extract.fingerprint import compute_fingerprint
from emotr.extract.weights import _set_seeded_weights
from emotr.pipeline import activation_cache, load_activations
from emotr.search.training_set import load_feature_set
from emotr.track import Tracker
from tests.conftest import decoded, demo_config

pytestmark = pytest.mark.slow

TAPS = "extract.taps=[gap5,gap4,gmp5,gap5_flip]"


def tap_cache(cfg: Config, tap: str) -> FeatureCache:
    fingerprint, inputs = compute_fingerprint(cfg.backbone, cfg.decode)
    return open_tap(cfg.cache.root, fingerprint, inputs, tap)


def part_files(cache: FeatureCache) -> dict[str, int]:
    return {path: Path(path).stat().st_mtime_ns for path in cache.part_paths()}


def keras_block_output(cfg: Config, pixels: np.ndarray, layer: str) -> np.ndarray:
    """A block's output from a VGG16 built here with Keras' own preprocess_input."""
    import keras

    conv_base = keras.applications.VGG16(
        include_top=False, weights=None, input_shape=(*cfg.backbone.input_size, 3)
    )
    _set_seeded_weights(conv_base, 0)  # what backbone.weights=none loads
    block = keras.Model(conv_base.input, conv_base.get_layer(layer).output)
    inputs = keras.applications.vgg16.preprocess_input(pixels.astype(np.float32))
    return np.asarray(block.predict_on_batch(inputs), np.float32)


def close(got: np.ndarray, expected: np.ndarray, rtol: float = 1e-4) -> bool:
    return float(np.abs(got - expected).max()) <= rtol * float(np.abs(expected).max())


def test_new_taps_on_a_warm_cache_take_one_pass_and_no_new_tap_takes_none(tmp_path, ray_local):
    cfg = demo_config(tmp_path)
    listing = list_images(cfg.data)
    first = extract_features(cfg, listing, progress=False)
    assert first.n_extracted == 24
    gap5_parts = part_files(tap_cache(cfg, "gap5"))

    tapped = demo_config(tmp_path, TAPS)
    summary = extract_features(tapped, listing, progress=False)
    # Three new taps, one pass: each image went through the extractor once more, not 3 times.
    assert (summary.n_extracted, summary.n_cached) == (24, 0)
    assert sum(summary.rows_per_worker.values()) == 24
    assert summary.fingerprint == first.fingerprint
    assert part_files(tap_cache(cfg, "gap5")) == gap5_parts  # gap5 is neither rewritten nor lost
    rows = {info.inputs.get("tap", "gap5"): info.n_rows for info in list_caches(cfg.cache.root)}
    assert rows == {"gap5": 24, "gap4": 24, "gmp5": 24, "gap5_flip": 24}
    assert verify_cache(cfg.cache.root) == []

    again = extract_features(tapped, listing, progress=False)
    assert (again.n_extracted, again.n_cached, again.n_actors) == (0, 24, 0)
    fewer = extract_features(demo_config(tmp_path, "extract.taps=[gap5,gap4]"), listing)
    assert (fewer.n_extracted, fewer.n_actors) == (0, 0)

    keys = listing.images["sha256"].tolist()
    pixels = decoded(cfg, listing.images["path"])
    block4 = keras_block_output(cfg, pixels, "block4_pool")
    block5 = keras_block_output(cfg, pixels, "block5_pool")
    assert close(tap_cache(cfg, "gap4").load(keys), block4.mean(axis=(1, 2)))
    assert close(tap_cache(cfg, "gmp5").load(keys), block5.max(axis=(1, 2)))
    assert close(tap_cache(cfg, "gap5").load(keys), block5.mean(axis=(1, 2)))
    mirrored = FeatureExtractor(cfg.backbone)(np.ascontiguousarray(pixels[:, :, ::-1]))
    assert close(tap_cache(cfg, "gap5_flip").load(keys), mirrored)


def test_cached_activations_round_trip_and_missing_ones_say_how_to_cache_them(tmp_path, ray_local):
    cfg = demo_config(tmp_path, "extract.cache_activation=block4_pool")
    listing = list_images(cfg.data)
    keys = listing.images["sha256"].tolist()
    with pytest.raises(ActivationsMissing, match=r"extract\.cache_activation: block4_pool"):
        load_activations(cfg, keys)

    summary = extract_features(cfg, listing, progress=False)
    assert summary.n_extracted == 24 and sum(summary.rows_per_worker.values()) == 24
    got = load_activations(cfg, keys[::-1])
    assert got.shape == (24, 2, 2, 512) and got.dtype == np.float32
    expected = keras_block_output(cfg, decoded(cfg, listing.images["path"]), "block4_pool")
    # bfloat16 keeps 8 bits of mantissa: within 2**-8 of each value.
    assert np.all(np.abs(got[::-1] - expected) <= np.abs(expected) * 2**-8 + 1e-6)
    assert np.abs(got).max() > 0

    cache = activation_cache(cfg)
    assert cache.inputs["activation_shape"] == "2x2x512"
    assert verify_cache(cfg.cache.root) == []
    # A second driver's copy of some rows (as one that listed before the first committed):
    # compact merges them, readers never see two.
    rows = cache._checked(got[::-1][:5])
    cache.publish_part(cache._table(keys[:5], rows, [64] * 5, [80] * 5))
    assert any("warning" in problem for problem in verify_cache(cfg.cache.root))
    assert compact_cache(cfg.cache.root).n_dropped == 5
    assert verify_cache(cfg.cache.root) == []
    assert np.array_equal(load_activations(cfg, keys[::-1]), got)
    with pytest.raises(ActivationsMissing, match="1 of 2 images"):
        load_activations(cfg, [keys[0], "0" * 64])


def test_a_search_on_combined_taps_registers_a_model_that_computes_them(tmp_path, ray_local):
    choice = "gap4+gap5_flipavg"
    cfg = demo_config(
        tmp_path,
        "extract.taps=[gap5,gap4,gap5_flip]",
        f"tune.baseline.features={choice}",
        f"tune.search_space={{features: {{type: categorical, choices: [{choice}, gap4]}}}}",
        "tune.n_trials=1",  # trial 0 is the baseline: the combination
        "registry.auto_promote=false",
    )
    tracker = Tracker(cfg.mlflow)
    listing = pipeline.prepare_listing(cfg)
    result = pipeline.run(cfg, tracker, listing)

    version = get_version(tracker, cfg.registry.model_name, result.model_version)
    assert version.tags["features"] == choice
    # No folder holds the combination: predict and the gate decode rather than read gap5.
    assert "feature_fingerprint" not in version.tags
    trials = tracker.find_runs("tags.`emotr.role` = 'trial'")
    assert {run.data.params["features"] for run in trials} == {choice}
    assert all(run.info.status == "FINISHED" for run in trials)

    # The registered image-in model computes the taps as the cache holds them: it gives the
    # trial's validation probabilities.
    validation = load_validation_set(tracker, version)
    served = load_model(tracker, f"models:/{version.name}/{version.version}").predict(
        pd.DataFrame({"path": validation["path"]})
    )
    assert served["error"].isna().all()
    features = load_feature_set(cfg.cache.root, cfg.tune, listing, result_fingerprint(cfg)).select(
        choice
    )
    assert features.x_val.shape[1] == 1024
    assert list(features.sha256_val) == validation["sha256"].tolist()
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracker.uri)
    try:
        head = mlflow.keras.load_model(f"runs:/{version.run_id}/model")
    finally:
        mlflow.set_tracking_uri(previous)
    trained = np.asarray(head(features.x_val, training=False)).reshape(-1)
    np.testing.assert_allclose(served["p_positive"].to_numpy(dtype=float), trained, atol=1e-4)


def result_fingerprint(cfg: Config) -> str:
    return compute_fingerprint(cfg.backbone, cfg.decode)[0]
