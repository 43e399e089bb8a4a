"""The features a search trains on: one cache's train/val matrices, checked, with their identity.

A leaf module: the search driver (emotr.search.tune) and its trial tasks (emotr.search.trial) both
use it. Besides gap5 (x_train, x_val) a FeatureSet holds every tap the search's `features` choices
read (emotr.taps); a trial takes its choice with `select`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from emotr.cache.store import FeatureCache, open_tap, read_inputs
from emotr.config import TuneConfig
from emotr.data.listing import Listing
from emotr.errors import EmotrError
from emotr.taps import DEFAULT_FEATURES, DEFAULT_TAP, combine_features, taps_of

log = logging.getLogger(__name__)


class FeatureError(EmotrError, ValueError):
    """Features that cannot train a head: absent from the cache, mis-shaped, or one class only."""


@dataclass(frozen=True)
class FeatureSet:
    """Train/validation features of one cache, with the identity of the cache and of the split."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    fingerprint: str
    split_digest: str
    # Every tap the search may choose (gap5 included), by split, rows as in x_train and x_val.
    taps_train: dict[str, np.ndarray] = field(default_factory=dict)
    taps_val: dict[str, np.ndarray] = field(default_factory=dict)
    # The images of the rows: what other caches (emotr.cache.activations) are read by.
    sha256_train: tuple[str, ...] = ()
    sha256_val: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_shapes(self)

    def select(self, features: str) -> FeatureSet:
        """These rows with x = the matrices of a `features` choice (e.g. gap4+gap5)."""
        if features == DEFAULT_FEATURES:
            return self
        missing = [tap for tap in taps_of(features) if tap not in self.taps_train]
        if missing:
            raise FeatureError(
                f"features {features!r} read taps {missing} this feature set does not hold "
                f"(it holds {sorted(self.taps_train) or [DEFAULT_TAP]}); list the choice in "
                "tune.search_space.features or tune.baseline.features"
            )
        return dataclasses.replace(
            self,
            x_train=combine_features(features, self.taps_train),
            x_val=combine_features(features, self.taps_val),
        )

    @property
    def identity(self) -> dict[str, str]:
        """The cache and split these features come from, as the study and its runs record them."""
        return {"feature_fingerprint": self.fingerprint, "split_digest": self.split_digest}


def check_shapes(features: FeatureSet) -> None:
    """x is (n, d) and y (n,) with two classes or more, in each split; both splits have the same
    d."""
    for name in ("train", "val"):
        x, y = getattr(features, f"x_{name}"), getattr(features, f"y_{name}")
        if x.ndim != 2 or len(x) != len(y):
            raise FeatureError(f"x_{name} {x.shape} and y_{name} {y.shape} must be (n, d) and (n,)")
        labels = np.unique(y).tolist()
        if len(labels) < 2 or min(labels) < 0:
            raise FeatureError(f"y_{name} must hold two class indexes or more, got {labels}")
    if features.x_train.shape[1] != features.x_val.shape[1]:
        raise FeatureError(
            f"train has {features.x_train.shape[1]} features, val {features.x_val.shape[1]}"
        )


def load_feature_set(
    root: str, tune: TuneConfig, listing: Listing, fingerprint: str, failed: Collection[str] = ()
) -> FeatureSet:
    """Cached features and labels of the listing's train and val images, from the folder
    `fingerprint` under the cache `root` (and its taps' folders that `tune` reads).

    Args:
        failed: sha256 of images the extraction that just ran could not decode; they are left out
            with a warning. Any other listed image missing from the cache is an error (run
            `emotr extract` first) unless tune.allow_partial_cache is set.
    """
    caches = tap_caches(root, fingerprint, searched_taps(tune))
    # An image counts as cached when every tap the search may read holds it.
    complete = set.intersection(*(cache.cached_hashes() for cache in caches.values()))
    cached = listing.images["sha256"].isin(complete)
    images = listing.images[cached]
    _check_missing(tune, listing.images[~cached], set(failed), fingerprint, len(images))
    parts = {}
    # The test split is never read here: no trial, early stop or choice of trial sees it.
    every_class = set(images["label"].tolist())
    for split in ("train", "val"):
        rows = images[images["split"] == split]
        missing = sorted(every_class - set(rows["label"].tolist()))
        if missing or len(every_class) < 2:
            raise FeatureError(
                f"the {split} split has no cached image of class(es) {missing or 'but one'}; "
                "add images "
                f"(data.root), change data.val_fraction, or fix the manifest's split column"
            )
        keys = rows["sha256"].tolist()
        taps = {tap: cache.load(keys) for tap, cache in caches.items()}
        parts[split] = (taps, rows["label"].to_numpy(np.int32), tuple(keys))
    return FeatureSet(
        x_train=parts["train"][0][DEFAULT_TAP],
        y_train=parts["train"][1],
        x_val=parts["val"][0][DEFAULT_TAP],
        y_val=parts["val"][1],
        fingerprint=fingerprint,
        split_digest=listing.digest,
        taps_train=parts["train"][0],
        taps_val=parts["val"][0],
        sha256_train=parts["train"][2],
        sha256_val=parts["val"][2],
    )


def searched_taps(tune: TuneConfig) -> tuple[str, ...]:
    """The taps the search's `features` choices read (baseline and search space), gap5 first."""
    taps = dict.fromkeys([DEFAULT_TAP])
    for choice in tune.searched("features"):
        taps.update(dict.fromkeys(taps_of(str(choice))))
    return tuple(taps)


def tap_caches(root: str, fingerprint: str, taps: Collection[str]) -> dict[str, FeatureCache]:
    """The caches of `taps` beside gap5's cache `fingerprint` under the cache `root`."""
    inputs = read_inputs(root, fingerprint)
    return {tap: open_tap(root, fingerprint, inputs, tap) for tap in taps}


def _check_missing(
    tune: TuneConfig, missing: pd.DataFrame, failed: set[str], fingerprint: str, n_cached: int
) -> None:
    """Refuse listed images without features, but those known to have failed to decode."""
    n_failed = int(missing["sha256"].isin(failed).sum())
    if n_failed:
        log.warning("%d images failed to decode and are left out", n_failed)
    n_absent = len(missing) - n_failed
    if not n_absent:
        return
    message = (
        f"{n_absent} images not in the cache for fingerprint {fingerprint}: "
        "run `emotr extract` first"
    )
    taps = searched_taps(tune)
    if len(taps) > 1:
        message += f" (the search reads taps {'+'.join(taps)}: keep them in extract.taps)"
    if n_cached == 0 or not tune.allow_partial_cache:
        raise FeatureError(
            f"{message} (or set tune.allow_partial_cache=true to tune on the cached ones)"
        )
    log.warning("%s; tune.allow_partial_cache is set: tuning without them", message)
