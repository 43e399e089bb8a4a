"""The Parquet feature cache: atomic, idempotent commits, lookups, verify, gc, compact."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from emotr.cache.fingerprint import fingerprint_of, tap_inputs
from emotr.cache.maintenance import compact_cache, export_npy, gc_cache, list_caches, verify_cache
from emotr.cache.store import CacheMiss, FeatureCache, part_name
from emotr.config import BackboneConfig, DecodeConfig
from emotr.extract.fingerprint import compute_fingerprint
from tests.counting_fs import LocalPassThrough

REPO = Path(__file__).resolve().parents[2]

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
    assert any(part.name in p and "corrupt" in p and "gc` deletes it" in p for p in problems)
    assert len(problems) == 2

    result = gc_cache(cache.root, min_age_s=0)
    assert sorted(result.removed) == sorted([str(folder / "_tmp-0123.parquet"), str(part)])
    assert result.skipped == []
    assert verify_cache(cache.root) == []
    assert len(FeatureCache.open(cache.root, cache.fingerprint).cached_hashes()) == 2


def test_verify_warns_of_rows_repeated_across_parts_and_reports_non_finite_values(tmp_path):
    cache, other = new_cache(tmp_path), new_cache(tmp_path)
    other.cached_hashes()  # a second driver that started before the first one committed
    commit(cache, keys("a", "b", "c"))
    commit(other, keys("b", "c", "d"))
    [problem] = verify_cache(cache.root, cache.fingerprint)
    assert problem.startswith(f"{cache.location}: warning: 2 image(s) are in both")
    assert "`emotr cache compact` merges them" in problem
    reader = FeatureCache.open(cache.root, cache.fingerprint)
    assert reader.cached_hashes() == set(keys("a", "b", "c", "d"))
    np.testing.assert_array_equal(reader.load(keys("c", "b")), features_for(keys("c", "b")))

    # A writer that bypassed the NaN check: what verify is for.
    names = keys("e")
    bad = features_for(names)
    bad[0, 3] = np.nan
    other.publish_part(other._table(names, bad, [1], [1]))
    assert any("NaN or infinite" in p for p in verify_cache(cache.root, cache.fingerprint))


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
    base = BackboneConfig(weights="none", input_size=(32, 32), precision="float32")
    fingerprint, inputs = compute_fingerprint(base, DecodeConfig())
    assert compute_fingerprint(base, DecodeConfig()) == (fingerprint, inputs)
    assert len(fingerprint) == 16 and inputs["cache_format"] == "1"
    changed_cfg = base.model_copy(update={changed: change})
    assert compute_fingerprint(changed_cfg, DecodeConfig())[0] != fingerprint


def test_fingerprint_changes_with_decode_background_only_for_pixels():
    backbone = BackboneConfig(weights="none", input_size=(32, 32), precision="float32")
    base, _ = compute_fingerprint(backbone, DecodeConfig())
    assert compute_fingerprint(backbone, DecodeConfig(background=(0, 0, 0)))[0] != base


def test_the_default_fingerprints_are_those_of_the_caches_made_before_vgg19():
    """Pinned values computed before backbone.name=vgg19, backbone.preprocess and decode.resize
    existed: vgg16 + caffe + bilinear must find the caches users already have."""
    small = BackboneConfig(weights="none", input_size=(32, 32), precision="float32")
    fingerprint, inputs = compute_fingerprint(small, DecodeConfig())
    assert fingerprint == "c4be3950a8aa4df6"
    assert fingerprint_of(tap_inputs(inputs, "gmp5")) == "2a0a0a752e3f6d20"
    assert (
        compute_fingerprint(BackboneConfig(precision="float32"), DecodeConfig())[0]
        == "d518ccf8e260daf4"
    )
    other = BackboneConfig(weights="none", input_size=(400, 500), precision="bfloat16")
    assert compute_fingerprint(other, DecodeConfig(background=(0, 0, 0)))[0] == "f84607b52df23fe9"


# backbone.name, backbone.preprocess and decode.resize: each its own folder.
TUTORIAL_CHANGES = [
    ("backbone", {"name": "vgg19"}),
    ("backbone", {"preprocess": "rescale"}),
    ("decode", {"resize": "nearest"}),
    ("backbone", {"name": "vgg19", "preprocess": "rescale"}),
]


@pytest.mark.parametrize(("section", "change"), TUTORIAL_CHANGES)
def test_backbone_preprocess_and_resize_get_caches_of_their_own(section, change, tmp_path):
    backbone = BackboneConfig(weights="none", input_size=(32, 32), precision="float32")
    decode = DecodeConfig()
    root = str(tmp_path / "cache")
    base, base_inputs = compute_fingerprint(backbone, decode)
    names = keys("a", "b", "c")
    commit(FeatureCache(root, base, base_inputs), names)
    if section == "backbone":
        backbone = backbone.model_copy(update=change)
    else:
        decode = decode.model_copy(update=change)
    fingerprint, inputs = compute_fingerprint(backbone, decode)
    assert fingerprint != base
    changed = FeatureCache(root, fingerprint, inputs)
    assert changed.cached_hashes() == set()  # nothing of the default's is taken for its own
    commit(changed, names[:1])
    # The default's cache is left as it was.
    assert FeatureCache.open(root, base).cached_hashes() == set(names)
    assert FeatureCache.open(root, fingerprint).cached_hashes() == set(names[:1])
    assert {info.fingerprint for info in list_caches(root)} == {base, fingerprint}


def test_each_tutorial_setting_names_its_own_fingerprint():
    backbone = BackboneConfig(weights="none", input_size=(32, 32), precision="float32")
    fingerprints = {compute_fingerprint(backbone, DecodeConfig())[0]}
    for section, change in TUTORIAL_CHANGES:
        changed_backbone = backbone.model_copy(update=change) if section == "backbone" else backbone
        decode = DecodeConfig(**change) if section == "decode" else DecodeConfig()
        fingerprints.add(compute_fingerprint(changed_backbone, decode)[0])
    assert len(fingerprints) == 1 + len(TUTORIAL_CHANGES)
    _, inputs = compute_fingerprint(
        backbone.model_copy(update={"name": "vgg19", "preprocess": "rescale"}),
        DecodeConfig(resize="nearest"),
    )
    assert (inputs["backbone"], inputs["preprocessing"]) == ("vgg19", "rescale")
    assert inputs["resize"].startswith("pillow-nearest")


class FaultyLocalFileSystem(LocalPassThrough):
    """The real local filesystem, except that reading one path fails as storage does."""

    def __init__(self, broken: str, fault: str):
        super().__init__()
        self.broken = broken
        self.fault = fault

    def _open(self, path: str, open_real):
        if path != self.broken:
            return open_real(path)
        if self.fault == "permission denied":
            raise PermissionError(13, "Permission denied", path)
        if self.fault == "connection reset":
            raise ConnectionResetError(104, "Connection reset by peer", path)
        if self.fault == "timeout":
            raise TimeoutError(f"read of {path} timed out")
        with open_real(path) as stream:  # "short read": the connection dropped half-way
            return pa.BufferReader(stream.read()[:200])

    def open_input_stream(self, path):
        return self._open(path, self.local.open_input_stream)

    def open_input_file(self, path):
        return self._open(path, self.local.open_input_file)


@pytest.mark.parametrize(
    "fault", ["permission denied", "connection reset", "timeout", "short read"]
)
def test_gc_keeps_a_part_it_cannot_read_now_and_deletes_a_corrupt_one(fault, tmp_path):
    cache = new_cache(tmp_path)
    commit(cache, keys("a", "b"))
    commit(cache, keys("c"))
    good, unreadable = cache.part_paths()
    corrupt = Path(cache.folder) / "part-0000000000000000.parquet"
    corrupt.write_bytes(b"garbage, not Parquet " * 50)
    faulty = pafs.PyFileSystem(FaultyLocalFileSystem(unreadable, fault))

    result = gc_cache(cache.root, min_age_s=0, filesystem=faulty)

    assert result.removed == [str(corrupt)]
    assert [path for path, _ in result.skipped] == [unreadable]
    assert "could not be read" in result.skipped[0][1]
    assert sorted(cache.part_paths()) == sorted([good, unreadable])
    # verify tells a storage error from damage too, and never sends the user to gc for it.
    [problem] = verify_cache(cache.root, filesystem=faulty)
    assert "could not be read" in problem and "cache gc" not in problem
    assert cache.cached_hashes() == set(keys("a", "b", "c"))


def write_bad_part(cache: FeatureCache, kind: str) -> Path:
    path = Path(cache.folder) / part_name(keys(kind))
    if kind == "wrong schema":
        pq.write_table(pa.table({"sha256": keys(kind), "label": [1]}), path)
    else:  # a writer that bypassed commit's check
        bad = features_for(keys(kind))
        bad[0, 7] = np.inf
        pq.write_table(cache._table(keys(kind), bad, [1], [1]), path)
    return path


@pytest.mark.parametrize("kind", ["wrong schema", "non-finite features"])
def test_gc_deletes_a_readable_part_that_fails_the_checks(kind, tmp_path):
    cache = new_cache(tmp_path)
    commit(cache, keys("a"))
    bad = write_bad_part(cache, kind)
    assert any(bad.name in p and "corrupt" in p for p in verify_cache(cache.root))
    assert gc_cache(cache.root).removed == [str(bad)]
    assert verify_cache(cache.root) == []


WRITER = """
import sys, time
from pathlib import Path
from tests.unit.test_cache import INPUTS, commit, keys
from emotr.cache.store import FeatureCache, fingerprint_of

root, ready, other, first, last, batch = sys.argv[1:]
cache = FeatureCache(root, fingerprint_of(INPUTS), INPUTS)
cache.cached_hashes()  # both drivers start from the same (empty) view of the cache
Path(ready).touch()
deadline = time.monotonic() + 60
while not Path(other).exists() and time.monotonic() < deadline:
    time.sleep(0.01)
names = keys(*map(str, range(int(first), int(last))))
for start in range(0, len(names), int(batch)):
    commit(cache, names[start : start + int(batch)])
"""


def test_two_drivers_at_once_leave_one_row_per_image_and_compact_merges_them(tmp_path):
    root = str(tmp_path / "cache")
    # Overlapping rows in batches of different sizes, so their parts have different names.
    ready_a, ready_b = tmp_path / "a-ready", tmp_path / "b-ready"
    args = [(ready_a, ready_b, 0, 60, 10), (ready_b, ready_a, 30, 90, 7)]
    drivers = [
        subprocess.Popen([sys.executable, "-c", WRITER, root, *map(str, a)], cwd=REPO) for a in args
    ]
    assert [driver.wait(timeout=120) for driver in drivers] == [0, 0]

    cache = FeatureCache.open(root, fingerprint_of(INPUTS))
    names = keys(*map(str, range(90)))
    n_stored = sum(pq.read_metadata(path).num_rows for path in cache.part_paths())
    assert n_stored == 120  # 30 images written by both drivers
    assert cache.cached_hashes() == set(names)
    np.testing.assert_array_equal(cache.load(names), features_for(names))
    assert list_caches(root)[0].n_rows == 90
    problems = verify_cache(root)
    assert problems and all("`emotr cache compact` merges them" in p for p in problems)

    result = compact_cache(root)

    assert result.n_dropped == 30 and result.removed
    stored = [k for path in cache.part_paths() for k in pq.read_table(path)["sha256"].to_pylist()]
    assert sorted(stored) == sorted(names)
    assert verify_cache(root) == []
    np.testing.assert_array_equal(cache.load(names), features_for(names))
    assert compact_cache(root).n_dropped == 0


def test_compact_keeps_a_part_that_already_holds_the_rows_it_would_write(tmp_path):
    ab, bc, c = keys("a0", "b0"), keys("b0", "c0"), keys("c0")
    # Parts are read in name order: {b, c} repeats b of {a, b} and keeps c, which part {c},
    # read later, already holds; compact must keep one copy of c, not delete both.
    assert part_name(ab) < part_name(bc) < part_name(c)
    writers = [new_cache(tmp_path) for _ in range(3)]
    for writer in writers:
        writer.cached_hashes()
    for writer, names in zip(writers, [ab, bc, c], strict=True):
        commit(writer, names)
    result = compact_cache(writers[0].root)
    assert result.n_dropped == 2 and result.written == []
    cache = FeatureCache.open(writers[0].root, writers[0].fingerprint)
    assert [Path(path).name for path in cache.part_paths()] == [part_name(ab), part_name(c)]
    assert verify_cache(cache.root) == []


def test_cache_compact_command_reports_what_it_merged(tmp_path):
    first, second = new_cache(tmp_path), new_cache(tmp_path)
    second.cached_hashes()
    commit(first, keys("a", "b"))
    commit(second, keys("b", "c"))
    root = f"cache.root={first.root}"

    def cache_command(verb: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "emotr.cli", "cache", verb, "-c", "conf/smoke.yaml", root],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )

    verified = cache_command("verify")  # repeated rows are a warning: readers use one copy
    assert verified.returncode == 0, verified.stderr
    assert "warning" in verified.stderr and "1 warning(s)" in " ".join(verified.stdout.split())
    result = cache_command("compact")
    assert result.returncode == 0, result.stderr
    assert "1 repeated row(s) dropped" in " ".join(result.stdout.split())
    assert verify_cache(first.root) == []


def test_complete_hashes_are_those_every_output_holds_and_follow_commits(tmp_path):
    from emotr.cache.sets import CacheSet

    gap5 = new_cache(tmp_path)
    other_inputs = {**INPUTS, "tap": "gmp5"}
    gmp5 = FeatureCache(gap5.root, fingerprint_of(other_inputs), other_inputs)
    h1, h2, h3, h4 = keys("1", "2", "3", "4")
    commit(gap5, [h1, h2, h3])
    commit(gmp5, [h2, h3, h4])
    # Fresh objects: the hashes come from the files, as on a warm run.
    caches = CacheSet(
        {
            "gap5": FeatureCache(gap5.root, gap5.fingerprint, INPUTS),
            "gmp5": FeatureCache(gmp5.root, gmp5.fingerprint, other_inputs),
        }
    )
    assert sorted(caches.complete_hashes().to_pylist()) == sorted([h2, h3])
    assert caches.missing_outputs([h1, h2]) == ["gmp5"] and caches.missing_outputs([]) == []
    commit(caches.caches["gmp5"], [h1])
    assert sorted(caches.complete_hashes().to_pylist()) == sorted([h1, h2, h3])
