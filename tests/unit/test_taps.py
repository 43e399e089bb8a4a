"""Feature taps, features choices, their fingerprints and the activation cache, without Ray."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from emotr.cache.activations import ActivationCache, ActivationsMissing
from emotr.cache.fingerprint import tap_inputs
from emotr.cache.maintenance import export_npy, gc_cache, list_caches, verify_cache
from emotr.cache.store import open_tap
from emotr.config import ConfigError
from emotr.config_io import load_config
from emotr.extract.backbone import FeatureExtractor, features_extractor, preprocess
from emotr.extract.fingerprint import compute_fingerprint, features_fingerprint
from emotr.pipeline import load_activations
from emotr.search.training_set import FeatureError, FeatureSet
from emotr.taps import combine_features, features_dim, parse_features, taps_of

SHA = [f"{i:064x}" for i in range(6)]


def test_features_choices_parse_into_the_taps_they_read():
    assert taps_of("gap5") == ("gap5",)
    assert taps_of("gap4+gap5_flipavg") == ("gap4", "gap5", "gap5_flip")
    assert features_dim("gap3+gap4+gmp5") == 256 + 512 + 512
    assert features_dim("gap1+gmp2_flipavg") == 64 + 128
    for bad, why in [
        ("gap6", "unknown feature tap 'gap6'"),
        ("gap5+gap5", "repeats a term"),
        ("gap5_flip_flipavg", "applies to an unflipped tap"),
        ("", "non-empty string"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_features(bad)


def test_combine_concatenates_and_averages_with_the_mirror_image():
    taps = {
        "gap4": np.full((2, 512), 1.0, np.float32),
        "gap5": np.full((2, 512), 2.0, np.float32),
        "gap5_flip": np.full((2, 512), 4.0, np.float32),
    }
    combined = combine_features("gap4+gap5_flipavg", taps)
    assert combined.shape == (2, 1024) and combined.dtype == np.float32
    assert (combined[:, :512] == 1).all() and (combined[:, 512:] == 3).all()
    np.testing.assert_array_equal(combine_features("gap5", taps), taps["gap5"])


def test_config_checks_taps_and_the_choices_that_read_them():
    cfg = load_config(
        [],
        [
            "extract.taps=[gap5,gap4,gap5_flip]",
            "tune.search_space.features={type: categorical, choices: [gap5, gap4+gap5_flipavg]}",
        ],
    )
    assert cfg.extract.taps == ("gap5", "gap4", "gap5_flip")
    defaults = load_config()
    assert defaults.extract.taps == ("gap5", "gap4", "gap4_flip")
    assert defaults.tune.baseline.features == "gap5"  # trial 0, the tutorial's
    with pytest.raises(ConfigError, match=r"extract.taps: must include gap5"):
        load_config([], ["extract.taps=[gap4]"])
    with pytest.raises(ConfigError, match=r"extract.taps: unknown feature tap 'gap9'"):
        load_config([], ["extract.taps=[gap5,gap9]"])
    with pytest.raises(ConfigError, match=r"reads tap\(s\) \['gap3'\].*add them to extract.taps"):
        load_config([], ["tune.search_space.features={type: categorical, choices: [gap5, gap3]}"])
    with pytest.raises(ConfigError, match=r"tune.baseline.features.*unknown feature tap"):
        load_config([], ["tune.baseline.features=avg5"])
    with pytest.raises(ConfigError, match=r"extract.cache_activation"):
        load_config([], ["extract.cache_activation=block5_pool"])


@pytest.mark.parametrize(
    ("overrides", "before"),
    [
        # Computed by emotr at 08a914a, before taps existed: the default cache keeps its name.
        (["backbone.weights=none", "backbone.precision=float32"], "189289d665612801"),
        (
            ["backbone.weights=none", "backbone.input_size=[32,32]", "backbone.precision=float32"],
            "c4be3950a8aa4df6",
        ),
        (["backbone.weights=none", "backbone.precision=bfloat16"], "44e00ca86194d115"),
    ],
)
def test_the_default_fingerprint_is_what_it_was_before_taps(overrides, before):
    cfg = load_config([], [*overrides, "extract.taps=[gap5,gap4,gap4_flip]"])
    fingerprint, _ = compute_fingerprint(cfg.backbone, cfg.decode)
    assert fingerprint == before
    assert features_fingerprint(cfg.backbone, cfg.decode, "gap5") == before


def test_each_tap_has_its_own_fingerprint_and_combinations_have_none():
    cfg = load_config([], ["backbone.weights=none"])
    fingerprint, inputs = compute_fingerprint(cfg.backbone, cfg.decode)
    assert tap_inputs(inputs, "gap5") == inputs
    assert tap_inputs(inputs, "gap3")["feature_dim"] == "256"
    folders = {
        tap: open_tap("/x", fingerprint, inputs, tap).fingerprint
        for tap in taps_of("gap5+gap4+gap3+gmp5+gap5_flipavg")
    }
    assert len(set(folders.values())) == 5 and folders["gap5"] == fingerprint
    assert features_fingerprint(cfg.backbone, cfg.decode, "gap4") == folders["gap4"]
    assert features_fingerprint(cfg.backbone, cfg.decode, "gap4+gap5") is None
    assert features_fingerprint(cfg.backbone, cfg.decode, "gap5_flipavg") is None


def feature_set(taps: dict | None = None) -> FeatureSet:
    y = np.array([0, 1, 0, 1], np.int32)
    x = np.arange(8, dtype=np.float32).reshape(4, 2)
    taps = taps if taps is not None else {"gap5": x, "gap4": x + 10}
    return FeatureSet(x, y, x, y, "f", "s", taps_train=taps, taps_val=taps)


def test_a_feature_set_selects_a_choice_of_the_taps_it_holds():
    chosen = feature_set().select("gap4+gap5")
    assert chosen.x_train.shape == (4, 4) and chosen.x_val[0].tolist() == [10, 11, 0, 1]
    assert feature_set().select("gap5").x_train.shape == (4, 2)
    with pytest.raises(FeatureError, match=r"read taps \['gmp5'\].*tune.search_space.features"):
        feature_set().select("gmp5")


def test_a_chosen_tap_extractor_gives_what_the_taps_give(caplog):
    cfg = load_config([], ["backbone.weights=none", "backbone.input_size=[32,32]"]).backbone
    pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    plain = FeatureExtractor(cfg, batch_size=4)(pixels)
    tapped = FeatureExtractor(cfg, batch_size=4, outputs=("gap5", "gap4", "gap5_flip"))
    outputs = tapped.extract_outputs(pixels)
    assert np.abs(outputs["gap5"] - plain).max() <= 1e-5 * np.abs(plain).max()
    mirrored = FeatureExtractor(cfg, batch_size=4)(np.ascontiguousarray(pixels[:, :, ::-1]))
    assert np.abs(outputs["gap5_flip"] - mirrored).max() <= 1e-5 * np.abs(plain).max()
    chosen = features_extractor(cfg, "gap4+gap5_flipavg", batch_size=4)(pixels)
    np.testing.assert_array_equal(chosen, combine_features("gap4+gap5_flipavg", outputs))


def test_blocks_1_and_2_pool_the_maps_of_the_same_pass():
    overrides = [
        "backbone.weights=none",
        "backbone.input_size=[32,32]",
        "backbone.precision=float32",
    ]
    cfg = load_config([], overrides).backbone
    pixels = np.random.default_rng(2).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    tapped = FeatureExtractor(cfg, batch_size=4, outputs=("gap5", "gap1", "gmp2"))
    outputs = tapped.extract_outputs(pixels)
    assert outputs["gap1"].shape == (3, 64) and outputs["gmp2"].shape == (3, 128)
    block1, block2, _ = tapped.model.get_layer("blocks")(preprocess(pixels, cfg.preprocess))
    np.testing.assert_allclose(outputs["gap1"], np.asarray(block1).mean(axis=(1, 2)), rtol=1e-5)
    np.testing.assert_allclose(outputs["gmp2"], np.asarray(block2).max(axis=(1, 2)), rtol=1e-5)


def test_the_mirror_pass_runs_only_up_to_the_deepest_flipped_tap():
    cfg = load_config([], ["backbone.weights=none", "backbone.input_size=[32,32]"]).backbone
    pixels = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    tapped = FeatureExtractor(cfg, batch_size=4, outputs=("gap5", "gap4", "gap4_flip"))
    mirror = tapped.model.get_layer("mirror_blocks")
    assert mirror.layers[-1].name == "block4_pool"
    assert not any(layer.name.startswith("block5") for layer in mirror.layers)
    outputs = tapped.extract_outputs(pixels)
    flipped = np.ascontiguousarray(pixels[:, :, ::-1])
    expected = FeatureExtractor(cfg, batch_size=4, outputs=("gap5", "gap4")).extract_outputs(
        flipped
    )
    scale = np.abs(expected["gap4"]).max()
    assert np.abs(outputs["gap4_flip"] - expected["gap4"]).max() <= 1e-5 * scale


def activation_cache(tmp_path) -> ActivationCache:
    inputs = {"backbone": "vgg16", "input_size": "64x48"}
    return ActivationCache.of(str(tmp_path / "cache"), "base", inputs, "block4_pool", (4, 3, 512))


def test_activations_round_trip_as_bfloat16_and_maintenance_knows_them(tmp_path):
    cache = activation_cache(tmp_path)
    values = np.random.default_rng(1).normal(size=(3, 4, 3, 512)).astype(np.float32)
    assert cache.commit(SHA[:3], values, [64] * 3, [48] * 3) == 3
    bits = values[:1].astype(ml_dtypes.bfloat16).view(np.uint16)  # as the actors ship them
    assert cache.commit(SHA[3:4], bits, [64], [48]) == 1
    got = cache.load([SHA[2], SHA[0], SHA[3]])
    assert got.dtype == np.float32 and got.shape == (3, 4, 3, 512)
    rounded = values.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(got, rounded[[2, 0, 0]])
    assert cache.load_bfloat16(SHA[:1]).dtype == ml_dtypes.bfloat16
    (info,) = list_caches(cache.root)
    assert info.n_rows == 4 and info.inputs["activation_shape"] == "4x3x512"
    assert info.holds == "block4_pool"
    assert info.n_bytes > 0
    assert verify_cache(cache.root) == []
    assert gc_cache(cache.root, min_age_s=0).removed == []  # valid parts are kept
    assert export_npy(cache.root, cache.fingerprint, tmp_path / "out") == 4
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "features.npy")[0], rounded[0])
    with pytest.raises(ValueError, match="NaN or infinite"):
        cache.commit(SHA[5:6], np.full((1, 4, 3, 512), np.nan, np.float32), [64], [48])
    with pytest.raises(ValueError, match=r"must be \(n, \(4, 3, 512\)\)"):
        cache.commit(SHA[5:6], np.zeros((1, 2, 2, 512), np.float32), [64], [48])


def test_load_activations_without_any_says_how_to_cache_them(tmp_path):
    cfg = load_config([], [f"cache.root={tmp_path}", "backbone.weights=none"])
    with pytest.raises(ActivationsMissing, match=r"extract.cache_activation: block4_pool"):
        load_activations(cfg, SHA[:2])
