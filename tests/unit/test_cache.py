"""The Parquet feature cache: atomic, idempotent commits, lookups, verify and fingerprints."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from emotr.cache import (
    CacheMiss,
    FeatureCache,
    compute_fingerprint,
    export_npy,
    fingerprint_of,
    gc_cache,
    list_caches,
    part_name,
    verify_cache,
)
from emotr.config import BackboneConfig, DecodeConfig

INPUTS = {"backbone": "vgg16", "input_size": "32x32", "cache_format": "1"}


def keys(*names: str) -> list[str]:
    return [hashlib.sha256(name.encode()).hexdigest() for name in names]


def features_for(names: list[str], dim: int = 512) -> np.ndarray:
    # Deterministic per key, so rows can be checked after any reordering.
    return np.stack([np.random.default_rng(int(k[:8], 16)).random(dim) for k in names]).astype(
        np.float32
    )


def new_cache(tmp_path) -> FeatureCache:
    return FeatureCache(str(tmp_path / "cache"), fingerprint_of(INPUTS), INPUTS)


def commit(cache: FeatureCache, names: list[str]) -> int:
    n = len(names)
    return cache.commit(names, features_for(names), [64] * n, [80] * n)


def test_commit_then_load_round_trips_in_the_asked_order(tmp_path):
    cache = new_cache(tmp_path)
    names = keys("a", "b", "c", "d")
    assert commit(cache, names) == 4
    order = [names[2], names[0], names[3]]
    loaded = FeatureCache.open(cache.root, cache.fingerprint).load(order)
    assert loaded.dtype == np.float32 and loaded.shape == (3, 512)
    np.testing.assert_array_equal(loaded, features_for(order))
    assert cache.cached_hashes() == set(names)


def test_recommitting_the_same_rows_writes_nothing(tmp_path):
    cache = new_cache(tmp_path)
    names = keys("a", "b")
    assert commit(cache, names) == 2
    assert commit(cache, names) == 0
    assert commit(FeatureCache.open(cache.root, cache.fingerprint), names) == 0
    assert len(cache.part_paths()) == 1


def test_overlapping_commits_and_repeats_keep_one_row_per_image(tmp_path):
    cache = new_cache(tmp_path)
    assert commit(cache, keys("a", "b", "a")) == 2
    assert commit(cache, keys("b", "c", "d", "c")) == 2
    assert len(cache.part_paths()) == 2
    assert verify_cache(cache.root) == []
    [info] = list_caches(cache.root)
    assert info.n_rows == 4


def test_missing_features_raise_cache_miss_with_count_and_fix(tmp_path):
    cache = new_cache(tmp_path)
    commit(cache, keys("a"))
    with pytest.raises(CacheMiss, match=r"2 of 3 images .*`emotr extract`"):
        cache.load(keys("a", "b", "c"))
    with pytest.raises(KeyError):
        new_cache(tmp_path / "empty").load(keys("a"))


def test_verify_reports_a_stray_tmp_file_and_a_truncated_part(tmp_path):
    cache = new_cache(tmp_path)
    commit(cache, keys("a", "b"))
    commit(cache, keys("c", "d"))
    assert verify_cache(cache.root) == []
    folder = tmp_path / "cache" / cache.fingerprint
    (folder / "_tmp-0123.parquet").write_bytes(b"PAR1 half a file")
    part = sorted(folder.glob("part-*.parquet"))[0]
    part.write_bytes(part.read_bytes()[:100])

    # Readers ignore the leftover; the truncated part is what verify and gc are for.
    problems = verify_cache(cache.root)
    assert any("_tmp-0123.parquet" in p and "leftover" in p for p in problems)
    assert any(part.name in p and "cannot be read" in p for p in problems)
    assert len(problems) == 2

    removed = gc_cache(cache.root, min_age_s=0)
    assert sorted(removed) == sorted([str(folder / "_tmp-0123.parquet"), str(part)])
    assert verify_cache(cache.root) == []
    assert len(FeatureCache.open(cache.root, cache.fingerprint).cached_hashes()) == 2


def test_verify_reports_rows_repeated_across_parts_and_non_finite_values(tmp_path):
    cache = new_cache(tmp_path)
    commit(cache, keys("a", "b"))
    # A second writer that did not know about the first commit (the driver is the only writer)
    # and bypassed the NaN check: what verify is for.
    names = keys("b", "c")
    bad = features_for(names)
    bad[1, 3] = np.nan
    other = new_cache(tmp_path)
    other._write_atomically(other._table(names, bad, [1, 1], [1, 1]), part_name(names))
    problems = verify_cache(cache.root, cache.fingerprint)
    assert any(names[0] in p and "both" in p for p in problems)
    assert any("NaN or infinite" in p for p in problems)


def test_commit_refuses_non_finite_features(tmp_path):
    cache = new_cache(tmp_path)
    names = keys("a")
    bad = features_for(names)
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        cache.commit(names, bad, [1], [1])
    assert cache.part_paths() == []


def test_parts_carry_the_fingerprint_inputs_and_the_schema(tmp_path):
    cache = new_cache(tmp_path)
    commit(cache, keys("a"))
    schema = pq.read_schema(cache.part_paths()[0])
    features = schema.field("features").type
    assert pa.types.is_fixed_size_list(features) and features.list_size == 512
    assert features.value_type == pa.float32() and schema.field("height").type == pa.int32()
    assert schema.metadata[b"emotr.fingerprint"].decode() == cache.fingerprint
    assert b'"input_size":"32x32"' in schema.metadata[b"emotr.inputs"]


def test_list_caches_counts_rows_parts_and_bytes_per_fingerprint(tmp_path):
    first = new_cache(tmp_path)
    commit(first, keys("a", "b", "c"))
    commit(first, keys("d"))
    other_inputs = {**INPUTS, "input_size": "64x64"}
    second = FeatureCache(first.root, fingerprint_of(other_inputs), other_inputs)
    commit(second, keys("a"))
    infos = {info.fingerprint: info for info in list_caches(first.root)}
    assert set(infos) == {first.fingerprint, second.fingerprint}
    assert (infos[first.fingerprint].n_rows, infos[first.fingerprint].n_parts) == (4, 2)
    assert (infos[second.fingerprint].n_rows, infos[second.fingerprint].n_parts) == (1, 1)
    assert infos[first.fingerprint].n_bytes > 4 * 512 * 4 * 0.5
    assert infos[second.fingerprint].inputs == other_inputs
    assert list_caches(str(tmp_path / "nowhere")) == []


def test_export_npy_writes_features_and_hashes_in_the_same_order(tmp_path):
    cache = new_cache(tmp_path)
    names = keys("a", "b", "c")
    commit(cache, names)
    assert export_npy(cache.root, cache.fingerprint, tmp_path / "out") == 3
    hashes = (tmp_path / "out" / "sha256.txt").read_text().split()
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "features.npy"), features_for(hashes))
    assert sorted(hashes) == sorted(names)


@pytest.mark.parametrize("changed", ["input_size", "weights", "precision"])
def test_fingerprint_changes_with_anything_that_changes_features(changed, tmp_path):
    weights_file = tmp_path / "vgg16.weights.h5"
    weights_file.write_bytes(b"not really weights, but a file with its own sha256")
    change = {
        "input_size": (64, 64),
        "weights": str(weights_file),
        "precision": "bfloat16",
    }[changed]
    base = BackboneConfig(weights="none", input_size=(32, 32))
    fingerprint, inputs = compute_fingerprint(base, DecodeConfig())
    assert compute_fingerprint(base, DecodeConfig()) == (fingerprint, inputs)
    assert len(fingerprint) == 16 and inputs["cache_format"] == "1"
    changed_cfg = base.model_copy(update={changed: change})
    assert compute_fingerprint(changed_cfg, DecodeConfig())[0] != fingerprint


def test_fingerprint_changes_with_decode_background_only_for_pixels():
    backbone = BackboneConfig(weights="none", input_size=(32, 32))
    base, _ = compute_fingerprint(backbone, DecodeConfig())
    assert compute_fingerprint(backbone, DecodeConfig(background=(0, 0, 0)))[0] != base
