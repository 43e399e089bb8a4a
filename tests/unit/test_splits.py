"""The three-way split rule (emotr.data.splits): units, groups, given splits, shared bytes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from emotr.config import DataConfig
from emotr.data.listing import DataError, assign_split, list_images
from tests.conftest import warns_in_log
from tests.unit.test_listing import CLASSES, random_hashes

VAL, TEST = 0.2, 0.1


def old_assign_split(sha256s, labels, val_fraction, seed) -> np.ndarray:
    """The two-way rule as emotr had it before the test split, written out again as it was."""
    hashes, label_array = np.asarray(sha256s, dtype=object), np.asarray(labels)
    scores = np.array(
        [int(hashlib.sha256(f"{seed}:{h}".encode()).hexdigest()[:16], 16) / 2**64 for h in hashes]
    )
    is_val = scores < val_fraction
    for label in np.unique(label_array):
        in_class = label_array == label
        if not is_val[in_class].any():
            picked = hashes[in_class][np.argmin(scores[in_class])]
            is_val[in_class & (hashes == picked)] = True
        elif is_val[in_class].all():
            picked = hashes[in_class][np.argmax(scores[in_class])]
            is_val[in_class & (hashes == picked)] = False
    return np.where(is_val, "val", "train")


def score(unit: str, seed: int = 0) -> float:
    return int(hashlib.sha256(f"{seed}:{unit}".encode()).hexdigest()[:16], 16) / 2**64


def write_files(folder: Path, n: int, start: int = 0) -> list[Path]:
    """n files of distinct bytes: only their hashes matter to the split."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img_{i:04d}.png" for i in range(start, start + n)]
    for path in paths:
        path.write_bytes(f"image {path.name}".encode())
    return paths


def write_manifest(path: Path, rows: dict[str, list]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def listed(manifest: Path, **fields):
    return list_images(DataConfig(manifest=str(manifest), classes=CLASSES, **fields))


@pytest.mark.parametrize("val_fraction", [0.05, 0.2, 0.5])
def test_without_a_test_fraction_the_split_is_the_two_way_rule_exactly(val_fraction):
    for seed in range(5):
        n = 300
        hashes = random_hashes(n, seed=100 + seed)
        # A tiny third class makes the old tiny-set rule fire too.
        labels = [i % 2 for i in range(n - 3)] + [2, 2, 2]

        new = assign_split(hashes, labels, val_fraction, seed)
        old = old_assign_split(hashes, labels, val_fraction, seed)

        assert new.tolist() == old.tolist(), (seed, val_fraction)


def test_without_a_test_fraction_a_listings_digest_is_the_one_caches_already_hold(tmp_path):
    for label, name in enumerate(CLASSES):
        write_files(tmp_path / name, 30, start=30 * label)

    listing = list_images(DataConfig(root=str(tmp_path), classes=CLASSES, test_fraction=0.0))

    images = listing.images
    old = old_assign_split(images["sha256"], images["label"], 0.2, seed=0)
    rows = sorted(zip(images["sha256"], images["label"], old, strict=True))
    text = "\n".join(f"{sha256},{label},{split}" for sha256, label, split in rows)
    assert images["split"].tolist() == old.tolist()
    assert listing.digest == hashlib.sha256(text.encode()).hexdigest()


def test_three_way_shares_per_class_are_close_to_the_fractions():
    hashes = random_hashes(3000, seed=8)
    labels = np.arange(3000) % 3

    split = assign_split(hashes, labels.tolist(), VAL, seed=0, test_fraction=TEST)

    for label in range(3):
        members = split[labels == label]
        assert abs((members == "test").mean() - TEST) < 0.03, label
        assert abs((members == "val").mean() - VAL) < 0.04, label


def test_a_units_split_follows_its_score_and_test_is_carved_first():
    hashes = random_hashes(400, seed=9)

    split = assign_split(hashes, [i % 2 for i in range(400)], VAL, 3, test_fraction=TEST)

    expected = [
        "test" if s < TEST else "val" if s < TEST + VAL else "train"
        for s in (score(h, 3) for h in hashes)
    ]
    assert split.tolist() == expected


@pytest.mark.parametrize("n_per_class", [2, 3])
def test_tiny_classes_get_train_and_val_even_with_a_large_test_fraction(n_per_class):
    for seed in range(40):
        hashes = random_hashes(2 * n_per_class, seed=seed)
        labels = [0] * n_per_class + [1] * n_per_class

        split = assign_split(hashes, labels, 0.3, seed, test_fraction=0.6)

        for members in (split[:n_per_class], split[n_per_class:]):
            assert {"train", "val"} <= set(members), (seed, split)


def test_a_given_split_wins_and_the_rule_tops_up_around_it():
    hashes, labels = random_hashes(3, seed=10), [0, 0, 0]

    # A tiny val share: the rule's image is train, and the class would have no val.
    low = assign_split(hashes, labels, 0.001, seed=0, given=["train", "train", None])
    # A huge one: the rule's image is val, and the class would have no train.
    high = assign_split(hashes, labels, 0.999, seed=0, given=["val", "test", None])

    assert low.tolist() == ["train", "train", "val"]
    assert high.tolist() == ["val", "test", "train"]
    assert score(hashes[2]) > 0.001 and score(hashes[2]) < 0.999  # the rule alone would not


def test_a_class_whose_given_splits_leave_no_val_is_an_error():
    hashes = random_hashes(4, seed=11)
    with pytest.raises(DataError, match=r"label 1 has no val image.*split val in the manifest"):
        assign_split(hashes, [0, 0, 1, 1], 0.2, seed=0, given=[None, None, "train", "train"])


def test_bad_arguments_are_value_errors():
    hashes = random_hashes(4, seed=12)
    with pytest.raises(ValueError, match="val_fraction \\+ test_fraction < 1"):
        assign_split(hashes, [0, 0, 1, 1], 0.5, seed=0, test_fraction=0.5)
    with pytest.raises(ValueError, match="one of \\['train', 'val', 'test'\\]"):
        assign_split(hashes, [0, 0, 1, 1], 0.2, seed=0, given=["dev", None, None, None])
    with pytest.raises(ValueError, match="one per image"):
        assign_split(hashes, [0, 0, 1], 0.2, seed=0)


def test_groups_never_straddle_splits_and_land_at_the_configured_shares(tmp_path):
    paths = write_files(tmp_path / "img", 200)
    n_groups, per_split = 40, {"train": 0, "val": 0, "test": 0}
    for seed in range(50):
        rng = np.random.default_rng(seed)
        groups = [f"person-{seed}-{g}" for g in rng.integers(0, n_groups, size=len(paths))]
        manifest = write_manifest(
            tmp_path / "m.csv",
            {
                "path": [str(p) for p in paths],
                "label": rng.integers(0, 2, len(paths)),
                "group": groups,
            },
        )

        images = listed(manifest, seed=seed).images

        assert images["group"].tolist() == groups
        by_group = images.groupby("group")["split"]
        assert (by_group.nunique() == 1).all(), seed
        for split in by_group.first():
            per_split[split] += 1
    n_total = sum(per_split.values())
    assert abs(per_split["test"] / n_total - TEST) < 0.03, per_split
    assert abs(per_split["val"] / n_total - VAL) < 0.04, per_split


def test_files_added_to_a_group_join_its_split(tmp_path):
    paths = write_files(tmp_path / "img", 120)
    groups = [f"g{i % 30}" for i in range(len(paths))]
    labels = [i % 2 for i in range(len(paths))]
    manifest = tmp_path / "m.csv"
    write_manifest(manifest, {"path": [str(p) for p in paths], "label": labels, "group": groups})
    before = listed(manifest).images.groupby("group")["split"].first()

    more = write_files(tmp_path / "img", 60, start=len(paths))
    more_groups = [f"g{i % 30}" for i in range(len(more))]
    write_manifest(
        manifest,
        {
            "path": [str(p) for p in [*paths, *more]],
            "label": labels + [i % 2 for i in range(60)],
            "group": groups + more_groups,
        },
    )
    after = listed(manifest).images

    assert set(before) == {"train", "val", "test"}
    assert (after.groupby("group")["split"].nunique() == 1).all()
    assert after.groupby("group")["split"].first().to_dict() == before.to_dict()


def test_a_split_column_is_kept_and_the_rest_is_split_by_the_rule(tmp_path):
    paths = write_files(tmp_path / "img", 80)
    given = ["Train", "VAL", " test ", "", ""] * 16  # any case, spaces; "" = the rule's
    manifest = write_manifest(
        tmp_path / "img" / "m.csv",
        {"path": [p.name for p in paths], "label": [i % 2 for i in range(80)], "split": given},
    )

    listing = listed(manifest)

    split = dict(zip(listing.images["path"], listing.images["split"], strict=True))
    sha256 = dict(zip(listing.images["path"], listing.images["sha256"], strict=True))
    for path, wanted in zip(paths, given, strict=True):
        if wanted.strip():
            assert split[str(path)] == wanted.strip().lower()
        else:
            s = score(sha256[str(path)])
            assert split[str(path)] == (
                "test" if s < TEST else "val" if s < TEST + VAL else "train"
            )
    assert listing.cross_split.empty
    ruled = [path for path, wanted in zip(paths, given, strict=True) if not wanted]
    assert len(listing.test()) == 16 + sum(score(sha256[str(path)]) < TEST for path in ruled)


def test_an_unknown_split_value_names_the_row(tmp_path):
    paths = write_files(tmp_path, 2)
    manifest = write_manifest(
        tmp_path / "m.csv",
        {"path": [p.name for p in paths], "label": ["negative", "positive"], "split": ["", "dev"]},
    )
    with pytest.raises(DataError, match=r"row 2 \(img_0001.png\): unknown split 'dev'"):
        listed(manifest)


def test_identical_bytes_in_two_given_splits_stay_only_in_the_earlier_one(tmp_path, caplog):
    paths = write_files(tmp_path / "img", 40)
    (tmp_path / "img" / "copy_in_test.png").write_bytes(paths[0].read_bytes())
    (tmp_path / "img" / "copy_in_val.png").write_bytes(paths[1].read_bytes())
    rows = {
        "path": [str(p) for p in paths]
        + [str(tmp_path / "img" / n) for n in ("copy_in_test.png", "copy_in_val.png")],
        "label": [i % 2 for i in range(40)] + [0, 1],
        "split": ["train", "val"] + [""] * 38 + ["test", "val"],
    }
    manifest = write_manifest(tmp_path / "m.csv", rows)

    with warns_in_log(caplog, "identical bytes in more than one split") as caught:
        listing = listed(manifest)

    cross = listing.cross_split.sort_values("path").reset_index(drop=True)
    test_copy = str(tmp_path / "img" / "copy_in_test.png")
    assert cross["path"].tolist() == [test_copy, str(paths[0])]
    assert cross["split"].tolist() == ["test", "train"]
    assert cross["kept"].tolist() == [False, True]
    assert list(cross.columns) == ["path", "label", "class_name", "sha256", "split", "kept"]
    assert test_copy not in set(listing.images["path"])
    assert str(paths[0]) in set(listing.train()["path"])
    assert len(listing.images) == 41  # paths[1]'s bytes are in val twice: one split, both kept
    assert test_copy in caught[0] and "cross_split_duplicates.csv" in caught[0]


def test_identical_bytes_in_two_groups_of_different_splits_stay_in_the_earlier(tmp_path, caplog):
    by_split = {}
    for name in (f"g{i}" for i in range(1000)):
        s = score(name)
        by_split.setdefault("test" if s < TEST else "val" if s < TEST + VAL else "train", name)
    paths = write_files(tmp_path / "img", 30)
    copy = tmp_path / "img" / "copy.png"
    copy.write_bytes(paths[0].read_bytes())
    groups = [by_split["val"]] + [None] * 29 + [by_split["test"]]
    manifest = write_manifest(
        tmp_path / "m.csv",
        {
            "path": [str(p) for p in [*paths, copy]],
            "label": [i % 2 for i in range(30)] + [0],
            "group": groups,
        },
    )

    with warns_in_log(caplog, "identical bytes in more than one split"):
        listing = listed(manifest)

    assert dict(zip(listing.cross_split["path"], listing.cross_split["kept"], strict=True)) == {
        str(paths[0]): True,
        str(copy): False,
    }
    assert set(listing.val()["path"]) >= {str(paths[0])}
    assert listing.images.set_index("path").loc[str(paths[1]), "group"] is None  # not NaN
    assert str(copy) not in set(listing.images["path"])


def test_the_digest_changes_when_a_given_split_moves_an_image(tmp_path):
    paths = write_files(tmp_path / "img", 20)
    rows = {"path": [str(p) for p in paths], "label": [i % 2 for i in range(20)]}
    plain = listed(write_manifest(tmp_path / "a.csv", rows))
    moved = plain.images.loc[plain.images["split"] != "test", "path"].iloc[0]
    split = ["test" if path == moved else "" for path in rows["path"]]

    given = listed(write_manifest(tmp_path / "b.csv", {**rows, "split": split}))

    assert given.images.set_index("path").loc[moved, "split"] == "test"
    assert given.digest != plain.digest


def test_classes_without_a_test_image_are_named_only_when_a_test_split_is_asked_for(
    tmp_path, caplog
):
    paths = write_files(tmp_path / "img", 42)
    rows = {
        "path": [str(p) for p in paths],
        "label": ["negative"] * 40 + ["positive"] * 2,
        "split": [""] * 40 + ["train", "val"],  # positive: nothing left for the rule
    }
    manifest = write_manifest(tmp_path / "m.csv", rows)

    with warns_in_log(caplog, r"no test image of class\(es\) positive") as caught:
        listing = listed(manifest)
    assert "negative" not in caught[0] and len(listing.test()) > 0
    caplog.clear()
    listed(manifest, test_fraction=0.0)
    assert "no test image" not in caplog.text


def test_a_parquet_manifest_takes_null_splits_and_numeric_groups(tmp_path):
    paths = write_files(tmp_path, 30)
    manifest = tmp_path / "m.parquet"
    given = ["test", None, None] * 10
    pd.DataFrame(
        {
            "path": [p.name for p in paths],
            "label": [i % 2 for i in range(30)],
            "split": given,
            "group": pd.array([i % 5 if i % 4 else None for i in range(30)], dtype="Int64"),
        }
    ).to_parquet(manifest)

    images = listed(manifest).images

    assert images["split"][[i for i, g in enumerate(given) if g]].eq("test").all()
    assert images["group"][1] == "1" and images["group"][4] is None  # text, or None (no NaN)
    ruled = images[[g is None for g in given]].dropna(subset=["group"])
    assert (ruled.groupby("group")["split"].nunique() == 1).all()
