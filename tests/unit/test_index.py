"""The listing index (emotr.data.index): unchanged files are not read, changed ones are, and the
index is written atomically."""

from __future__ import annotations

import hashlib
import itertools
import os
from pathlib import Path

import pandas as pd
import pytest

from emotr.data.index import (
    index_location,
    list_images_indexed,
    read_index,
    scan_images,
    write_index,
)
from emotr.data.listing import (
    DataError,
    complete_listing,
    hash_files,
    list_files,
    list_images,
)
from tests import counting_fs
from tests.conftest import warns_in_log
from tests.unit.test_listing import data_config, write_folders, write_image


@pytest.fixture
def ids():
    return itertools.count(1)


@pytest.fixture
def counted(tmp_path, monkeypatch) -> Path:
    """Every local open for reading by emotr in this test goes through a counting filesystem."""

    for module in counting_fs.modules_resolving():
        monkeypatch.setattr(module, "resolve", module.resolve)  # restored after the test
    log = tmp_path / "opens.log"
    counting_fs.install(str(log))
    return log


def test_warm_listing_reads_no_image_and_equals_a_full_listing(tmp_path, ids, counted):
    root, cache = tmp_path / "data", str(tmp_path / "cache")
    paths = write_folders(root, ids, n_per_class=4)
    cfg = data_config(root=str(root))

    cold = list_images_indexed(cfg, cache)
    assert sorted(counting_fs.opened(counted, root)) == sorted(map(str, paths))
    counted.unlink()
    warm = list_images_indexed(cfg, cache)

    assert counting_fs.opened(counted, root) == []
    pd.testing.assert_frame_equal(warm.images, cold.images)
    assert warm.digest == cold.digest == list_images(cfg).digest


def test_a_touched_file_is_hashed_again_and_nothing_else(tmp_path, ids, counted):
    root, cache = tmp_path / "data", str(tmp_path / "cache")
    paths = write_folders(root, ids, n_per_class=4)
    cfg = data_config(root=str(root))
    list_images_indexed(cfg, cache)
    counted.unlink()

    write_image(paths[2], next(ids))  # new bytes, new size or mtime
    scan = scan_images(cfg, cache)
    assert scan.unknown()["path"].tolist() == [str(paths[2])]
    listing = scan.complete_here()

    assert counting_fs.opened(counted, root) == [str(paths[2])]
    new_hash = hashlib.sha256(paths[2].read_bytes()).hexdigest()
    assert new_hash in set(listing.images["sha256"])
    assert scan_images(cfg, cache).unknown().empty  # the index learned it


def test_a_renamed_file_keeps_its_hash_and_split(tmp_path, ids):
    root, cache = tmp_path / "data", str(tmp_path / "cache")
    paths = write_folders(root, ids, n_per_class=5)
    cfg = data_config(root=str(root))
    before = list_images_indexed(cfg, cache).images.set_index("path")

    renamed = paths[1].with_name("renamed.png")
    paths[1].rename(renamed)
    after = list_images_indexed(cfg, cache).images.set_index("path")

    old = before.loc[str(paths[1])]
    assert str(paths[1]) not in after.index
    assert after.loc[str(renamed), "sha256"] == old["sha256"]
    assert after.loc[str(renamed), "split"] == old["split"]


def test_a_class_with_one_file_fails_before_any_image_is_read(tmp_path, ids, counted):
    root = tmp_path / "data"
    for name in ("negative/a.png", "negative/b.png", "positive/c.png"):
        write_image(root / name, next(ids))

    with pytest.raises(DataError, match=r"class 'positive' has 1 distinct image"):
        scan_images(data_config(root=str(root)), str(tmp_path / "cache"))

    assert counting_fs.opened(counted, root) == []


def test_the_index_lives_under_the_cache_and_nothing_is_written_to_the_data_root(tmp_path, ids):
    root, cache = tmp_path / "data", tmp_path / "cache"
    write_folders(root, ids)
    before = sorted(p for p in root.rglob("*"))

    list_images_indexed(data_config(root=str(root)), str(cache))

    assert sorted(p for p in root.rglob("*")) == before
    [index] = (cache / "_listings").glob("*.parquet")
    assert str(index) == index_location(str(cache), data_config(root=str(root)))
    assert read_index(str(index))["location"].str.startswith(str(root)).all()


def test_one_folder_named_three_ways_has_one_index(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    cache = str(tmp_path / "cache")
    names = ["data", f"{tmp_path}/data/", f"file://{tmp_path}/data"]
    assert len({index_location(cache, data_config(root=name)) for name in names}) == 1
    assert index_location(cache, data_config(root="s3://b/x/")) == index_location(
        cache, data_config(root="s3://b/x")
    )


def test_manifest_listings_use_the_index_too(tmp_path, ids):
    paths = write_folders(tmp_path / "images", ids, n_per_class=3)
    manifest = tmp_path / "labels.csv"
    rows = [f"{path.relative_to(tmp_path)},{path.parent.name}" for path in paths]
    manifest.write_text("path,label\n" + "\n".join(rows) + "\n")
    cfg, cache = data_config(manifest=str(manifest)), str(tmp_path / "cache")

    cold = list_images_indexed(cfg, cache)
    write_image(paths[0], next(ids))
    scan = scan_images(cfg, cache)

    assert scan.unknown()["path"].tolist() == [str(paths[0])]
    assert len(scan.complete_here().images) == len(cold.images) == 6


def test_a_temporary_index_left_by_a_killed_writer_is_ignored(tmp_path, ids):
    root, cache = tmp_path / "data", str(tmp_path / "cache")
    write_folders(root, ids)
    cfg = data_config(root=str(root))
    list_images_indexed(cfg, cache)
    location = Path(index_location(cache, cfg))
    good = location.read_bytes()
    # What a writer killed mid-write leaves: a _tmp- file holding the first half of an index.
    (location.parent / f"_tmp-0123-{location.name}").write_bytes(good[: len(good) // 2])

    assert scan_images(cfg, cache).unknown().empty
    assert location.read_bytes() == good


def test_cache_gc_deletes_what_a_killed_index_writer_left(tmp_path, ids):
    from emotr.cache.maintenance import gc_cache

    root, cache = tmp_path / "data", str(tmp_path / "cache")
    write_folders(root, ids)
    list_images_indexed(data_config(root=str(root)), cache)
    leftover = tmp_path / "cache" / "_listings" / "_tmp-0123-x.parquet"
    leftover.write_bytes(b"half")

    assert gc_cache(cache, min_age_s=0).removed == [str(leftover)]
    assert len(list((tmp_path / "cache" / "_listings").glob("*.parquet"))) == 1


def test_an_unreadable_index_is_ignored_with_a_warning(tmp_path, ids, caplog):
    root, cache = tmp_path / "data", str(tmp_path / "cache")
    write_folders(root, ids)
    cfg = data_config(root=str(root))
    location = Path(index_location(cache, cfg))
    location.parent.mkdir(parents=True)
    location.write_bytes(b"PAR1 not really")

    scan = scan_images(cfg, cache)

    assert len(scan.unknown()) == 6
    assert "hashing the files again" in caplog.text
    scan.complete_here()
    assert len(read_index(str(location))) == 6  # replaced by a good one


def test_write_index_replaces_the_old_one_whole(tmp_path):
    location = str(tmp_path / "cache" / "_listings" / "x.parquet")
    frame = pd.DataFrame(
        {"location": ["/a", "/b"], "size": [1, 2], "mtime_ns": [3, 4], "sha256": ["s", "t"]}
    )
    write_index(location, frame)
    write_index(location, frame.iloc[:1])

    pd.testing.assert_frame_equal(read_index(location), frame.iloc[:1])
    assert os.listdir(tmp_path / "cache" / "_listings") == ["x.parquet"]


def test_a_warm_listing_takes_the_stored_splits_only_under_the_same_rule(tmp_path, ids, caplog):
    root, cache = tmp_path / "data", str(tmp_path / "cache")
    paths = write_folders(root, ids, n_per_class=6)
    (root / "positive" / "copy.jpg").write_bytes(paths[0].read_bytes())  # a label conflict
    cfg = data_config(root=str(root))
    with warns_in_log(caplog, "identical bytes"):
        cold = list_images_indexed(cfg, cache)

    warm_scan = scan_images(cfg, cache)
    assert warm_scan.stored is not None  # the split rule and the files are unchanged
    with warns_in_log(caplog, "identical bytes"):  # still said on every run
        warm = warm_scan.complete_here()
    pd.testing.assert_frame_equal(warm.images, cold.images)
    pd.testing.assert_frame_equal(warm.conflicts, cold.conflicts)
    assert warm.digest == cold.digest

    reseeded = data_config(root=str(root), seed=cfg.seed + 1)
    scan = scan_images(reseeded, cache)
    assert scan.stored is None  # another seed splits anew
    with warns_in_log(caplog, "identical bytes"):
        listing = scan.complete_here()
    with warns_in_log(caplog, "identical bytes"):
        assert listing.digest == list_images(reseeded).digest
    assert scan_images(reseeded, cache).stored is not None  # the index now keeps that rule


def test_a_manifest_relabelling_unchanged_files_is_split_again(tmp_path, ids):
    root, cache = tmp_path / "data", str(tmp_path / "cache")
    paths = write_folders(root, ids, n_per_class=5)
    manifest = tmp_path / "manifest.csv"
    rows = [(str(path), path.parent.name) for path in paths]
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(manifest, index=False)
    cfg = data_config(manifest=str(manifest))
    list_images_indexed(cfg, cache)
    assert scan_images(cfg, cache).stored is not None

    rows[0] = (rows[0][0], "positive" if rows[0][1] == "negative" else "negative")
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(manifest, index=False)
    scan = scan_images(cfg, cache)
    assert scan.stored is None and scan.unknown().empty  # hashes still known, labels changed
    relabelled = scan.complete_here().images.set_index("path")
    assert relabelled.loc[rows[0][0], "class_name"] == rows[0][1]
    assert relabelled.loc[rows[0][0], "label"] == list(cfg.classes).index(rows[0][1])


def assert_same_listing(warm, cold) -> None:
    for name in ("images", "conflicts", "cross_split"):
        pd.testing.assert_frame_equal(getattr(warm, name), getattr(cold, name), obj=name)
    assert warm.digest == cold.digest


def write_split_manifest(tmp_path: Path, ids, splits: list[str]) -> Path:
    """A manifest of len(splits) images of distinct bytes, labels alternating, with the split
    column `splits`, and two copies of the first image's bytes given val and test."""
    root = tmp_path / "data"
    paths = [write_image(root / f"img_{i:03d}.png", next(ids)) for i in range(len(splits))]
    copies = [root / "copy_val.png", root / "copy_test.png"]
    for copy in copies:
        copy.write_bytes(paths[0].read_bytes())
    labels = [("negative", "positive")[i % 2] for i in range(len(splits))]
    frame = pd.DataFrame(
        {
            "path": [str(path) for path in [*paths, *copies]],
            "label": [*labels, labels[0], labels[0]],
            "split": [*splits, "val", "test"],
            "group": [f"g{i % 7}" if i % 3 else "" for i in range(len(splits) + 2)],
        }
    )
    manifest = tmp_path / "manifest.csv"
    frame.to_csv(manifest, index=False)
    return manifest


def test_a_warm_listing_with_splits_and_groups_equals_a_cold_one(tmp_path, ids, caplog):
    splits = ["train", ""] * 10
    manifest = write_split_manifest(tmp_path, ids, splits)
    cfg, cache = data_config(manifest=str(manifest)), str(tmp_path / "cache")
    found = list_files(cfg)
    with warns_in_log(caplog, "more than one split"):
        cold = complete_listing(cfg, found, hash_files(found.sources()))
    with warns_in_log(caplog, "more than one split"):
        first = list_images_indexed(cfg, cache)

    scan = scan_images(cfg, cache)
    assert scan.stored is not None
    with warns_in_log(caplog, "more than one split"):  # said on warm runs too
        warm = scan.complete_here()

    assert_same_listing(first, cold)
    assert_same_listing(warm, cold)
    assert len(cold.cross_split) == 3 and cold.cross_split["kept"].sum() == 1
    assert set(cold.cross_split.loc[~cold.cross_split["kept"], "split"]) == {"val", "test"}
    assert cold.images["group"].notna().any() and {"train", "val"} <= set(cold.images["split"])


def test_a_changed_split_or_group_column_splits_again(tmp_path, ids, caplog):
    manifest = write_split_manifest(tmp_path, ids, ["train", ""] * 10)
    cfg, cache = data_config(manifest=str(manifest)), str(tmp_path / "cache")
    with warns_in_log(caplog, "more than one split"):
        list_images_indexed(cfg, cache)
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)

    for row, column, value in ((3, "split", "test"), (5, "group", "another")):
        frame.loc[row, column] = value
        frame.to_csv(manifest, index=False)
        scan = scan_images(cfg, cache)
        assert scan.stored is None and scan.unknown().empty, column  # same files, new rule
        with warns_in_log(caplog, "more than one split"):
            listing = scan.complete_here()
        with warns_in_log(caplog, "more than one split"):
            assert_same_listing(listing, list_images(cfg))
        assert listing.images.set_index("path").loc[frame.loc[row, "path"], column] == value


def test_another_test_fraction_splits_again(tmp_path, ids):
    root, cache = tmp_path / "data", str(tmp_path / "cache")
    write_folders(root, ids, n_per_class=8)
    list_images_indexed(data_config(root=str(root)), cache)

    two_way = data_config(root=str(root), test_fraction=0.0)
    scan = scan_images(two_way, cache)
    assert scan.stored is None
    listing = scan.complete_here()

    assert set(listing.images["split"]) == {"train", "val"}
    assert listing.digest == list_images(two_way).digest
    assert scan_images(two_way, cache).stored is not None


def test_the_index_keeps_test_splits(tmp_path, ids):
    root, cache = tmp_path / "data", str(tmp_path / "cache")
    write_folders(root, ids, n_per_class=20)
    cfg = data_config(root=str(root), test_fraction=0.3)

    cold = list_images_indexed(cfg, cache)
    warm = list_images_indexed(cfg, cache)

    assert "test" in set(cold.images["split"])
    assert_same_listing(warm, cold)
