"""data.exclude: listed files leave every split by path or sha256, nothing else moves, bad CSVs
are named, and the listing index never serves a listing made under another exclude list."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pytest

from emotr.config import DataConfig
from emotr.data.exclude import read_exclude
from emotr.data.index import scan_images
from emotr.data.listing import list_images
from emotr.errors import DataError
from tests.conftest import write_class_folders

CLASSES = ("angry", "happy")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    write_class_folders(folder, classes=CLASSES, n_per_class=15, size=16)
    return folder


def data_config(root: Path, exclude: Path | None = None, **extra) -> DataConfig:
    return DataConfig(
        root=str(root),
        classes=CLASSES,
        val_fraction=0.3,
        test_fraction=0.2,
        exclude=None if exclude is None else str(exclude),
        **extra,
    )


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def splits_of(images: pd.DataFrame) -> dict[str, str]:
    return dict(zip(images["path"], images["split"], strict=True))


def test_paths_and_sha256s_leave_every_split_and_move_nothing_else(root: Path, tmp_path: Path):
    before = list_images(data_config(root))
    every = splits_of(before.images)
    by_split = before.images.groupby("split")["path"].first()  # one file of each split
    targets = [Path(by_split["train"]), Path(by_split["val"]), Path(by_split["test"])]
    csv = tmp_path / "exclude.csv"
    pd.DataFrame(
        {
            # An absolute path, a path relative to data.root, and a file named by its bytes only.
            "path": [str(targets[0]), str(targets[1].relative_to(root)), ""],
            "sha256": ["", "", sha256_of(targets[2]).upper()],
        }
    ).to_csv(csv, index=False)
    after = list_images(data_config(root, csv))
    left_out = {str(path) for path in targets}
    assert not left_out & set(after.images["path"])
    assert set(after.excluded["path"]) == left_out
    assert {"path", "sha256", "label", "split"} <= set(after.excluded.columns)
    assert dict(zip(after.excluded["path"], after.excluded["split"], strict=True)) == {
        path: every[path] for path in left_out
    }
    # The split rule scores each file's own bytes: no other file changed split.
    assert splits_of(after.images) == {p: s for p, s in every.items() if p not in left_out}
    assert after.digest != before.digest


def test_a_sha256_column_alone_leaves_out_every_copy(root: Path, tmp_path: Path):
    original = root / "happy" / "img_000.png"
    copy = root / "happy" / "copy_of_000.png"
    copy.write_bytes(original.read_bytes())
    csv = tmp_path / "exclude.csv"
    csv.write_text(f"sha256\n{sha256_of(original)}\n")
    listing = list_images(data_config(root, csv))
    assert set(listing.excluded["path"]) == {str(original), str(copy)}
    assert str(copy) not in set(listing.images["path"])


def test_manifest_paths_are_taken_from_its_folder(root: Path, tmp_path: Path):
    files = sorted(root.glob("*/*.png"))
    manifest = root.parent / "manifest.csv"
    pd.DataFrame(
        {
            "path": [str(f.relative_to(root.parent)) for f in files],
            "label": [f.parent.name for f in files],
        }
    ).to_csv(manifest, index=False)
    csv = tmp_path / "exclude.csv"
    csv.write_text(f"path\n{files[0].relative_to(root.parent)}\n")
    listing = list_images(data_config(root, csv, manifest=str(manifest)))
    assert listing.excluded["path"].tolist() == [str(files[0])]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("file,label\na.png,happy\n", r"has neither a 'path' nor a 'sha256' column .*file"),
        ("sha256\nnot-a-hash\n", r"1 sha256 cell\(s\) are not 64 hex digits \(not-a-hash\)"),
        ("", r"cannot be read as a CSV"),
    ],
)
def test_a_bad_csv_is_named_with_the_columns_it_needs(tmp_path: Path, content, match):
    csv = tmp_path / "exclude.csv"
    csv.write_text(content)
    with pytest.raises(DataError, match=match) as caught:
        read_exclude(data_config(tmp_path, csv))
    assert str(csv) in str(caught.value)


def test_a_missing_csv_is_named(tmp_path: Path):
    csv = tmp_path / "nowhere.csv"
    with pytest.raises(DataError, match=rf"data.exclude {csv} does not exist .*'path' and/or"):
        read_exclude(data_config(tmp_path, csv))


def test_excluding_a_whole_class_split_is_refused(root: Path, tmp_path: Path):
    listing = list_images(data_config(root))
    val = listing.val()
    csv = tmp_path / "exclude.csv"
    val[val["label"] == 0][["path"]].to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"leaves class 'angry' without a val image"):
        list_images(data_config(root, csv))


def test_the_listing_index_follows_the_exclude_list(root: Path, tmp_path: Path):
    cache = str(tmp_path / "cache")
    csv = tmp_path / "exclude.csv"
    first, second = sorted(root.glob("angry/*.png"))[:2]
    csv.write_text(f"path\n{first}\n")
    cfg = data_config(root, csv)
    cold = scan_images(cfg, cache).complete_here()
    warm_scan = scan_images(cfg, cache)
    assert warm_scan.stored is not None  # the stored splits are used ...
    warm = warm_scan.complete_here()
    assert warm.excluded["path"].tolist() == [str(first)] == cold.excluded["path"].tolist()
    assert warm.digest == cold.digest
    assert splits_of(warm.images) == splits_of(cold.images)
    csv.write_text(f"path\n{second}\n")  # ... until the list changes
    changed = scan_images(cfg, cache).complete_here()
    assert changed.excluded["path"].tolist() == [str(second)]
    assert str(first) in set(changed.images["path"])
    assert changed.digest != cold.digest
    unexcluded = scan_images(data_config(root), cache).complete_here()
    assert unexcluded.excluded.empty
    assert splits_of(unexcluded.images) == splits_of(list_images(data_config(root)).images)
