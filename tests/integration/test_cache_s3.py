"""The feature cache on a real S3 API (moto's server): commits, reads, failed writes, compact."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from emotr.cache.fingerprint import fingerprint_of
from emotr.cache.maintenance import compact_cache, gc_cache, list_caches, verify_cache
from emotr.cache.store import FeatureCache, list_files, part_name
from tests.unit.test_cache import INPUTS, commit, features_for, keys

pytestmark = pytest.mark.slow


def file_names(cache: FeatureCache) -> list[str]:
    return [info.base_name for info in list_files(cache.filesystem, cache.folder)]


def test_parts_committed_to_s3_read_back_whole(s3_bucket):
    root = f"{s3_bucket}/cache"
    cache = FeatureCache(root, fingerprint_of(INPUTS), INPUTS)
    assert commit(cache, keys("a", "b", "c")) == 3
    assert commit(cache, keys("c", "d")) == 1

    reader = FeatureCache.open(root, cache.fingerprint)
    names = keys("d", "a", "c", "b")
    assert reader.cached_hashes() == set(names)
    np.testing.assert_array_equal(reader.load(names), features_for(names))
    assert [info.n_rows for info in list_caches(root)] == [4]
    # Published by copy: the temporary keys are gone, only the parts and their inputs remain.
    assert sorted(file_names(cache)) == sorted(
        ["fingerprint.json", part_name(keys("a", "b", "c")), part_name(keys("d"))]
    )
    assert verify_cache(root) == []
    assert gc_cache(root, min_age_s=0).removed == []


def test_a_write_that_fails_midway_leaves_no_part_for_readers(s3_bucket):
    root = f"{s3_bucket}/cache"
    cache = FeatureCache(root, fingerprint_of(INPUTS), INPUTS)
    commit(cache, keys("a"))
    names = keys("b", "c")
    sink = pa.BufferOutputStream()
    pq.write_table(cache._table(names, features_for(names), [1, 1], [1, 1]), sink)
    data = sink.getvalue().to_pybytes()

    def write_half_then_fail(stream: pa.NativeFile) -> None:
        stream.write(data[: len(data) // 2])
        raise ConnectionResetError(104, "Connection reset by peer")

    with pytest.raises(ConnectionResetError):
        cache._put(f"{cache.folder}/{part_name(names)}", write_half_then_fail)

    assert sorted(file_names(cache)) == ["fingerprint.json", part_name(keys("a"))]
    reader = FeatureCache.open(root, cache.fingerprint)
    assert reader.cached_hashes() == set(keys("a"))
    assert verify_cache(root) == []
    # The next commit of those rows (a retry) goes through.
    assert commit(reader, names) == 2
    np.testing.assert_array_equal(reader.load(names), features_for(names))


def test_compact_merges_rows_two_writers_left_on_s3(s3_bucket):
    root = f"{s3_bucket}/cache"
    first, second = (FeatureCache(root, fingerprint_of(INPUTS), INPUTS) for _ in range(2))
    second.cached_hashes()  # it started before the first one committed
    commit(first, keys("a", "b", "c"))
    commit(second, keys("b", "c", "d"))
    assert all("`emotr cache compact` merges them" in p for p in verify_cache(root))

    assert compact_cache(root).n_dropped == 2

    assert verify_cache(root) == []
    reader = FeatureCache.open(root, first.fingerprint)
    names = keys("a", "b", "c", "d")
    np.testing.assert_array_equal(reader.load(names), features_for(names))
    n_stored = sum(
        pq.read_metadata(p, filesystem=reader.filesystem).num_rows for p in reader.part_paths()
    )
    assert n_stored == 4
