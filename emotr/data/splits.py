"""The split rule: train, val or test for each image, by a keyed hash of its group or its bytes.

A unit (the manifest's group, else the image's sha256) is scored by a keyed hash, so its split is
the same on every machine, does not depend on listing order and does not move when other images
are added or removed; a manifest's given split wins over the score. Bytes that still land in two
splits (given splits, groups) stay only in the earliest, so no split is evaluated on what an
earlier one holds.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

from emotr.data.manifest import SPLITS, named
from emotr.errors import DataError

log = logging.getLogger(__name__)

CROSS_SPLIT_COLUMNS = ["path", "label", "class_name", "sha256", "split", "kept"]
# The tiny-set rule's donors for a class missing a split, in order, and which unit each gives.
_DONORS = {
    "val": (("train", np.argmin), ("test", np.argmax)),
    "train": (("val", np.argmax), ("test", np.argmax)),
}


def no_cross_split() -> pd.DataFrame:
    """An empty cross-split report (path, label, class_name, sha256, split, kept)."""
    return pd.DataFrame({name: pd.Series(dtype=object) for name in CROSS_SPLIT_COLUMNS})


def assign_split(
    units: Sequence[str],
    labels: Sequence[int],
    val_fraction: float,
    seed: int,
    test_fraction: float = 0.0,
    given: Sequence[str | None] | None = None,
) -> np.ndarray:
    """The split ("train", "val" or "test") of each image, decided by a keyed hash of its unit.

    A unit is what must not straddle splits: the image's group where it has one, else its
    sha256. With ``score = int(sha256(f"{seed}:{unit}")[:16], 16) / 2**64`` a unit is test when
    score < test_fraction, val when score < test_fraction + val_fraction, else train: each class
    gets about those shares, identical bytes share a split, and adding images never moves
    existing ones. `given` (None: the rule decides) wins over the rule. The only non-local
    decision is the tiny-set rule, among rule-split images: a class with no val image gets the
    train unit of the smallest score moved to val, one with no train image the val unit of the
    largest; test is never topped up (it gives its largest unit only when train or val has none
    to give). Only while that rule fires can added images move the unit it picked.
    """
    n_units = len(units)
    _check_split_arguments(n_units, labels, val_fraction, test_fraction, given)
    codes, distinct = pd.factorize(np.asarray(units, dtype=object))
    scores = np.array([_split_score(unit, seed) for unit in distinct], dtype=np.float64)[codes]
    split = np.where(
        scores < test_fraction,
        "test",
        np.where(scores < test_fraction + val_fraction, "val", "train"),
    ).astype(object)
    ruled = np.ones(n_units, dtype=bool)
    if given is not None:
        given_array = np.asarray(given, dtype=object)
        ruled = pd.isna(given_array)
        split[~ruled] = given_array[~ruled]
    label_array = np.asarray(labels)
    for label in np.unique(label_array):
        in_class = label_array == label
        _top_up(split, scores, codes, ruled, in_class)
        for wanted in ("train", "val"):
            if not (split[in_class] == wanted).any():
                raise DataError(
                    f"label {label} has no {wanted} image: the split rule had fewer than 2 "
                    "distinct images (or groups) of it to share between train and val; add "
                    f"images to that class, or give some of them split {wanted} in the manifest"
                )
    return split.astype(str)


def _check_split_arguments(
    n_units: int,
    labels: Sequence[int],
    val_fraction: float,
    test_fraction: float,
    given: Sequence[str | None] | None,
) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if not (0.0 <= test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
        raise ValueError(
            f"test_fraction must be in [0, 1) with val_fraction + test_fraction < 1, got "
            f"{test_fraction} (val_fraction {val_fraction})"
        )
    if len(labels) != n_units or (given is not None and len(given) != n_units):
        raise ValueError(
            f"got {n_units} units, {len(labels)} labels and "
            f"{n_units if given is None else len(given)} given splits; pass one per image"
        )
    unknown = {value for value in (() if given is None else given) if pd.notna(value)}
    unknown -= set(SPLITS)
    if unknown:
        raise ValueError(f"given splits must be one of {list(SPLITS)} or None, got {unknown}")


def _top_up(
    split: np.ndarray,
    scores: np.ndarray,
    codes: np.ndarray,
    ruled: np.ndarray,
    in_class: np.ndarray,
) -> None:
    """The tiny-set rule for one class, in place: whole rule-split units move."""
    for wanted, choices in _DONORS.items():
        if (split[in_class] == wanted).any():
            continue
        for donor, pick in choices:
            candidates = np.flatnonzero(in_class & ruled & (split == donor))
            if not len(candidates):
                continue
            unit = codes[candidates[pick(scores[candidates])]]
            moved = ruled & (codes == unit)
            # train and val give only what leaves them an image of the class; test may go empty.
            if donor != "test" and not (in_class & (split == donor) & ~moved).any():
                continue
            split[moved] = wanted
            break


def _split_score(sha256: str, seed: int) -> float:
    # The first 8 bytes of the digest, big-endian: int(hexdigest()[:16], 16) without the text.
    keyed = hashlib.sha256(f"{seed}:{sha256}".encode()).digest()
    return int.from_bytes(keyed[:8], "big") / 2**64


def drop_cross_split(images: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Bytes in two splits (given splits, groups) stay only in the earliest: train < val < test."""
    if not (pd.notna(images["group"]).any() or pd.notna(images["given_split"]).any()):
        return images, no_cross_split()  # a split by content hash: identical bytes share one
    rank = images["split"].map({name: order for order, name in enumerate(SPLITS)}).to_numpy()
    by_hash = pd.Series(rank).groupby(images["sha256"].to_numpy())
    first = by_hash.transform("min").to_numpy()
    cross = by_hash.transform("nunique").to_numpy() > 1
    kept = rank == first
    report = images.loc[cross, CROSS_SPLIT_COLUMNS[:-1]].assign(kept=kept[cross])
    report = report.reset_index(drop=True)
    if len(report):
        _warn_cross_split(report)
    return images[~cross | kept].reset_index(drop=True), report


def _warn_cross_split(report: pd.DataFrame) -> None:
    dropped = report[~report["kept"]]
    shown = [f"{row.path} ({row.split})" for row in dropped.itertuples()]
    log.warning(
        "%d image(s) have identical bytes in more than one split: the copies in the later split "
        "were left out (train < val < test), so no split is evaluated on bytes an earlier one "
        "holds: %s; fix the manifest's split or group columns (every path is in "
        "data/cross_split_duplicates.csv of the run)",
        report["sha256"].nunique(),
        named(shown),
    )


def warn_missing_test(images: pd.DataFrame, classes: Sequence[str]) -> None:
    """Log the classes with no test image: the test split is never topped up, so a small class
    may have none."""
    tested = set(images.loc[images["split"] == "test", "label"].tolist())
    missing = [name for label, name in enumerate(classes) if label not in tested]
    if missing:
        log.warning(
            "no test image of class(es) %s: the test split (data.test_fraction) is never topped "
            "up, so scores on it leave them out; add images to them or raise data.test_fraction",
            ", ".join(missing),
        )
