"""Data discovery, manifests, content hashes and the deterministic split (emotr.data.listing)."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from emotr.config import DataConfig
from emotr.data.listing import (
    IMAGE_EXTENSIONS,
    DataError,
    assign_split,
    list_images,
    resolve_classes,
)
from tests.conftest import warns_in_log

_FORMATS = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".bmp": "BMP",
    ".webp": "WEBP",
    ".gif": "GIF",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}


CLASSES = ("negative", "positive")


def data_config(**fields) -> DataConfig:
    """A DataConfig naming the two classes these tests write, unless `fields` say otherwise."""
    return DataConfig(**{"classes": CLASSES, **fields})


@pytest.fixture
def ids() -> Iterator[int]:
    """Distinct image ids, so that every written image has its own bytes."""
    return itertools.count(1)


def write_image(path: Path, image_id: int) -> Path:
    """An 8x8 image in the format its extension names, its pixels spelling `image_id` in binary."""
    # Bits as black/white pixels: lossy JPEG maps close flat ids to identical bytes.
    pixels = [(255, 255, 255) if image_id >> bit & 1 else (0, 0, 40) for bit in range(64)]
    image = Image.new("RGB", (8, 8))
    image.putdata(pixels)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=_FORMATS[path.suffix.lower()])
    return path


def write_folders(root: Path, ids, n_per_class: int = 3) -> list[Path]:
    """root/negative and root/positive with n_per_class PNGs each."""
    return [
        write_image(root / name / f"{name}_{i:03d}.png", next(ids))
        for name in ("negative", "positive")
        for i in range(n_per_class)
    ]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def random_hashes(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [rng.bytes(32).hex() for _ in range(n)]


def split_by_path(cfg: DataConfig) -> dict[str, str]:
    images = list_images(cfg).images
    return dict(zip(images["path"], images["split"], strict=True))


def test_walks_nested_folders_with_any_extension_case_and_skips_hidden_and_other_files(
    tmp_path, ids
):
    root = tmp_path / "data"
    wanted = {
        write_image(root / "negative" / "a.png", next(ids)): 0,
        write_image(root / "negative" / "sub" / "deeper" / "b.JPG", next(ids)): 0,
        write_image(root / "positive" / "c.Png", next(ids)): 1,
        write_image(root / "positive" / "x" / "d.jpeg", next(ids)): 1,
    }
    write_image(root / "negative" / ".hidden.png", next(ids))
    write_image(root / "negative" / ".cache" / "e.png", next(ids))
    (root / "positive" / "notes.txt").write_text("not an image")
    write_image(root / "other" / "f.png", next(ids))

    images = list_images(data_config(root=str(root))).images

    assert list(images.columns) == ["path", "label", "class_name", "sha256", "split", "group"]
    assert images["path"].tolist() == sorted(str(path) for path in wanted)
    assert all(Path(path).is_absolute() for path in images["path"])
    for row in images.itertuples():
        assert row.label == wanted[Path(row.path)]
        assert row.class_name == ("negative", "positive")[row.label]
        assert row.sha256 == sha256_of(Path(row.path))
    assert set(images["split"]) <= {"train", "val", "test"}
    assert images["group"].isna().all()


def test_finds_every_listed_extension(tmp_path, ids):
    root = tmp_path / "data"
    for ext in sorted(IMAGE_EXTENSIONS):
        write_image(root / "negative" / f"img{ext}", next(ids))
        write_image(root / "positive" / f"IMG{ext.upper()}", next(ids))

    images = list_images(data_config(root=str(root))).images

    assert sorted(Path(path).suffix.lower() for path in images["path"]) == sorted(
        [*IMAGE_EXTENSIONS, *IMAGE_EXTENSIONS]
    )


def test_relative_root_gives_absolute_paths(tmp_path, ids, monkeypatch):
    write_folders(tmp_path / "data", ids, n_per_class=2)
    monkeypatch.chdir(tmp_path)

    images = list_images(data_config(root="data")).images

    assert all(path.startswith(str(tmp_path / "data")) for path in images["path"])


def test_file_uri_root_lists_the_same_local_files(tmp_path, ids):
    write_folders(tmp_path, ids, n_per_class=2)

    by_uri = list_images(data_config(root=f"file://{tmp_path}"))
    by_path = list_images(data_config(root=str(tmp_path)))

    pd.testing.assert_frame_equal(by_uri.images, by_path.images)


def test_csv_manifest_with_names_indices_relative_paths_and_extra_columns(tmp_path, ids):
    images_dir = tmp_path / "images"
    a, b, c, d = (write_image(images_dir / f"{n}.png", next(ids)) for n in "abcd")
    manifest = tmp_path / "lists" / "train.csv"
    manifest.parent.mkdir()
    manifest.write_text(
        "path,label,source\n"
        "../images/a.png,negative,web\n"
        f"{b},0,web\n"
        "../images/c.png,positive,camera\n"
        "../images/d.png,1,camera\n"
    )

    images = list_images(data_config(root="/nowhere", manifest=str(manifest))).images

    assert dict(zip(images["path"], images["label"], strict=True)) == {
        str(a): 0,
        str(b): 0,
        str(c): 1,
        str(d): 1,
    }
    assert images["class_name"].tolist() == ["negative", "negative", "positive", "positive"]


@pytest.mark.parametrize("labels", [[0, 0, 1, 1], ["negative", "negative", "positive", "positive"]])
def test_parquet_manifest(tmp_path, ids, labels):
    paths = [write_image(tmp_path / "img" / f"{n}.jpg", next(ids)) for n in "abcd"]
    manifest = tmp_path / "manifest.parquet"
    pd.DataFrame(
        {"path": [f"img/{path.name}" for path in paths], "label": labels, "weight": 1.0}
    ).to_parquet(manifest)

    images = list_images(data_config(manifest=str(manifest))).images

    assert images["path"].tolist() == [str(path) for path in paths]
    assert images["label"].tolist() == [0, 0, 1, 1]
    assert images["sha256"].tolist() == [sha256_of(path) for path in paths]


def test_manifest_unknown_label_names_row_value_and_classes(tmp_path, ids):
    write_image(tmp_path / "a.png", next(ids))
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\na.png,negative\na.png,happy\n")

    with pytest.raises(DataError, match=r"row 2.*'happy'.*\['negative', 'positive'\]"):
        list_images(data_config(manifest=str(manifest)))


def test_manifest_out_of_range_index_is_an_unknown_label(tmp_path, ids):
    write_image(tmp_path / "a.png", next(ids))
    manifest = tmp_path / "m.parquet"
    pd.DataFrame({"path": ["a.png"], "label": [2]}).to_parquet(manifest)

    with pytest.raises(DataError, match=r"unknown label 2.*index 0\.\.1"):
        list_images(data_config(manifest=str(manifest)))


def test_manifest_missing_column(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("file,label\na.png,0\n")

    with pytest.raises(DataError, match=r"lacks column\(s\) \['path'\]"):
        list_images(data_config(manifest=str(manifest)))


def test_manifest_missing_file_is_named(tmp_path, ids):
    for name in ("a", "b", "c"):
        write_image(tmp_path / f"{name}.png", next(ids))
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\na.png,0\nb.png,0\nc.png,1\ngone.png,1\n")

    with pytest.raises(DataError, match=f"not found.*{tmp_path / 'gone.png'}"):
        list_images(data_config(manifest=str(manifest)))


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match=f"data root {tmp_path / 'nope'} does not exist"):
        list_images(data_config(root=str(tmp_path / "nope")))


def test_missing_class_folder_is_named(tmp_path, ids):
    write_image(tmp_path / "negative" / "a.png", next(ids))

    with pytest.raises(DataError, match=f"class folder {tmp_path / 'positive'} does not exist"):
        list_images(data_config(root=str(tmp_path)))


def test_class_folder_without_images_is_named(tmp_path, ids):
    write_image(tmp_path / "negative" / "a.png", next(ids))
    (tmp_path / "positive").mkdir()
    (tmp_path / "positive" / "notes.txt").write_text("todo")

    with pytest.raises(DataError, match=f"no images in {tmp_path / 'positive'}: expected .*\\.jpg"):
        list_images(data_config(root=str(tmp_path)))


def test_class_with_one_image_cannot_be_split(tmp_path, ids):
    write_image(tmp_path / "negative" / "a.png", next(ids))
    write_image(tmp_path / "negative" / "b.png", next(ids))
    write_image(tmp_path / "positive" / "c.png", next(ids))

    with pytest.raises(DataError, match=r"class 'positive' has 1 distinct image"):
        list_images(data_config(root=str(tmp_path)))


def test_same_bytes_under_two_labels_are_reported_and_dropped(tmp_path, ids, caplog):
    write_folders(tmp_path, ids, n_per_class=3)
    shared = next(ids)
    left = write_image(tmp_path / "negative" / "shared.png", shared)
    right = write_image(tmp_path / "positive" / "copy" / "shared.png", shared)

    with warns_in_log(caplog, "identical bytes") as caught:
        listing = list_images(data_config(root=str(tmp_path)))

    message = caught[0]
    assert str(left) in message and str(right) in message
    assert sorted(listing.conflicts["path"]) == sorted([str(left), str(right)])
    assert list(listing.conflicts.columns) == ["path", "label", "class_name", "sha256"]
    assert sha256_of(left) not in set(listing.images["sha256"])
    assert len(listing.images) == 6


def test_duplicates_under_one_label_stay_together(tmp_path, ids):
    write_folders(tmp_path, ids, n_per_class=4)
    duplicate = next(ids)
    for name in ("dup1.png", "dup2.png", "sub/dup3.png"):
        write_image(tmp_path / "positive" / name, duplicate)

    listing = list_images(data_config(root=str(tmp_path)))

    rows = listing.images[listing.images["path"].str.contains("/dup")]
    assert len(rows) == 3 and rows["split"].nunique() == 1
    assert listing.conflicts.empty


def test_same_folder_twice_gives_the_same_listing(tmp_path, ids):
    write_folders(tmp_path, ids, n_per_class=4)
    cfg = data_config(root=str(tmp_path))

    first, second = list_images(cfg), list_images(cfg)

    pd.testing.assert_frame_equal(first.images, second.images)
    assert first.digest == second.digest
    assert len(first.train()) + len(first.val()) + len(first.test()) == len(first.images) == 8
    for name in ("train", "val", "test"):
        assert (getattr(first, name)()["split"] == name).all()


def test_digest_changes_when_an_image_is_added(tmp_path, ids):
    write_folders(tmp_path, ids, n_per_class=3)
    cfg = data_config(root=str(tmp_path))
    before = list_images(cfg).digest

    write_image(tmp_path / "positive" / "new.png", next(ids))

    assert list_images(cfg).digest != before


def test_split_is_deterministic_per_seed():
    hashes = random_hashes(200, seed=1)
    labels = [i % 2 for i in range(200)]

    first = assign_split(hashes, labels, 0.2, seed=0)

    assert (first == assign_split(hashes, labels, 0.2, seed=0)).all()
    assert (first != assign_split(hashes, labels, 0.2, seed=1)).any()
    assert set(first) == {"train", "val"}


def test_split_of_existing_images_is_stable_when_images_are_added(tmp_path, ids):
    write_folders(tmp_path, ids, n_per_class=10)
    cfg = data_config(root=str(tmp_path), val_fraction=0.3)
    before = split_by_path(cfg)

    for i in range(10):
        write_image(tmp_path / ("negative", "positive")[i % 2] / f"new_{i}.png", next(ids))
    after = split_by_path(cfg)

    assert len(after) == len(before) + 10
    assert {path: after[path] for path in before} == before


def test_split_stability_on_many_hashes():
    hashes, labels = random_hashes(500, seed=2), [i % 2 for i in range(500)]
    more, more_labels = random_hashes(10, seed=3), [0] * 5 + [1] * 5

    before = assign_split(hashes, labels, 0.2, seed=0)
    after = assign_split(hashes + more, labels + more_labels, 0.2, seed=0)

    assert (after[:500] == before).all()


def test_val_share_per_class_is_close_to_val_fraction():
    rng = np.random.default_rng(4)
    hashes = random_hashes(500, seed=5)
    labels = rng.integers(0, 2, size=500)

    split = assign_split(hashes, labels.tolist(), 0.2, seed=0)

    for label in (0, 1):
        share = (split[labels == label] == "val").mean()
        assert abs(share - 0.2) < 0.07, (label, share)


@pytest.mark.parametrize("val_fraction", [0.01, 0.5, 0.99])
def test_tiny_classes_get_a_val_and_a_train_image(val_fraction):
    for seed in range(30):
        hashes = random_hashes(5, seed=seed)
        labels = [0, 0, 1, 1, 1]

        split = assign_split(hashes, labels, val_fraction, seed)

        for members in (split[:2], split[2:]):
            assert set(members) == {"train", "val"}, (seed, val_fraction, split)


def test_assign_split_rejects_a_class_of_identical_images():
    same = random_hashes(1, seed=6) * 3
    with pytest.raises(DataError, match="fewer than 2 distinct images"):
        assign_split([*same, *random_hashes(2, seed=7)], [0, 0, 0, 1, 1], 0.2, seed=0)


def test_classes_null_are_the_roots_folders_sorted_without_hidden_ones(tmp_path, ids):
    for name in ("Positive", "Negative", ".thumbs", "_listings"):
        write_image(tmp_path / name / "a.png", next(ids))
        write_image(tmp_path / name / "b.png", next(ids))
    (tmp_path / "notes.txt").write_text("a file, not a class")

    data = resolve_classes(DataConfig(root=str(tmp_path)))

    assert data.classes == ("Negative", "Positive")
    assert data.root == str(tmp_path) and data.test_fraction == DataConfig().test_fraction
    assert list_images(data).images.groupby("class_name").size().to_dict() == {
        "Negative": 2,
        "Positive": 2,
    }


def test_given_classes_are_kept_as_they_are(tmp_path):
    data = DataConfig(root=str(tmp_path / "nowhere"), classes=("b", "a"))
    assert resolve_classes(data) is data  # no folder is listed: it need not even exist


@pytest.mark.parametrize("folders", [[], ["only"], ["only", ".hidden", "_private"]])
def test_fewer_than_two_class_folders_is_an_error_naming_the_fix(tmp_path, folders):
    for name in folders:
        (tmp_path / name).mkdir()
    n_classes = len([name for name in folders if name[0] not in "._"])

    with pytest.raises(DataError) as error:
        resolve_classes(DataConfig(root=str(tmp_path)))

    message = str(error.value)
    assert f"data.root {tmp_path} has {n_classes} class folder(s)" in message
    assert "set data.classes or add folders" in message


def test_classes_null_on_a_missing_root_names_the_root(tmp_path):
    with pytest.raises(DataError, match=f"data root {tmp_path / 'nope'} does not exist"):
        resolve_classes(DataConfig(root=str(tmp_path / "nope")))


def test_classes_null_with_a_manifest_are_its_label_names_sorted(tmp_path, ids):
    paths = [write_image(tmp_path / f"{n}.png", next(ids)) for n in "abcdef"]
    manifest = tmp_path / "m.csv"
    labels = ["sad", " happy", "neutral", "happy", "sad", "neutral"]
    rows = [f"{path.name},{label}" for path, label in zip(paths, labels, strict=True)]
    manifest.write_text("path,label\n" + "\n".join(rows) + "\n")

    data = resolve_classes(DataConfig(manifest=str(manifest)))

    assert data.classes == ("happy", "neutral", "sad")
    images = list_images(data).images
    assert images["class_name"].tolist() == ["sad", "happy", "neutral", "happy", "sad", "neutral"]
    assert images["label"].tolist() == [2, 0, 1, 0, 2, 1]


@pytest.mark.parametrize("labels", [[0, 1, 1, 0], ["0", "1", "1", "0"], ["cat", "1", "cat", "1"]])
def test_classes_null_with_index_labels_asks_for_data_classes(tmp_path, labels):
    manifest = tmp_path / "m.parquet"
    pd.DataFrame({"path": list("abcd"), "label": labels}).to_parquet(manifest)

    with pytest.raises(DataError, match=r"index labels \(.*1.*\).*set data.classes"):
        resolve_classes(DataConfig(manifest=str(manifest)))


def test_a_manifest_of_one_label_name_is_an_error(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\na.png,cat\nb.png,cat\n")

    with pytest.raises(DataError, match=r"has 1 label name\(s\) \(cat\).*set data.classes"):
        resolve_classes(DataConfig(manifest=str(manifest)))


def test_listing_before_the_classes_are_resolved_says_so(tmp_path, ids):
    write_folders(tmp_path, ids, n_per_class=2)

    with pytest.raises(ValueError, match="resolve_classes"):
        list_images(DataConfig(root=str(tmp_path)))


def test_four_classes_are_listed_and_split_each(tmp_path, ids):
    names = ("angry", "happy", "neutral", "sad")
    for name in names:
        for i in range(12):
            write_image(tmp_path / name / f"{i}.png", next(ids))

    listing = list_images(resolve_classes(DataConfig(root=str(tmp_path), test_fraction=0.0)))

    images = listing.images
    assert images.groupby("label")["class_name"].first().tolist() == list(names)
    assert (images.groupby("class_name").size() == 12).all()
    for name in names:
        assert set(images.loc[images["class_name"] == name, "split"]) == {"train", "val"}


def test_one_of_four_classes_with_one_image_is_named(tmp_path, ids):
    for name in ("angry", "happy", "neutral", "sad"):
        for i in range(1 if name == "neutral" else 3):
            write_image(tmp_path / name / f"{i}.png", next(ids))

    with pytest.raises(DataError, match=r"class 'neutral' has 1 distinct image"):
        list_images(resolve_classes(DataConfig(root=str(tmp_path))))
