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
from emotr.cache.views import load_views
from emotr.config import TuneConfig
from emotr.data.listing import Listing
from emotr.errors import EmotrError
from emotr.taps import (
    DEFAULT_FEATURES,
    DEFAULT_TAP,
    FLIP_SUFFIX,
    combine_features,
    parse_features,
    taps_of,
)

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
    # Augmented views (extract.views) of each unflipped tap, (n, K, dim) by tap; and of the
    # features choice `select` made, (n, K, features_dim), for heads with train_views.
    views_train: dict[str, np.ndarray] = field(default_factory=dict)
    views_val: dict[str, np.ndarray] = field(default_factory=dict)
    x_views_train: np.ndarray | None = None
    x_views_val: np.ndarray | None = None
    # What must not straddle cross-validation folds: the manifest's group, else the sha256.
    units_train: tuple[str, ...] = ()
    units_val: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_shapes(self)

    def select(self, features: str) -> FeatureSet:
        """These rows with x = the matrices of a `features` choice (e.g. gap4+gap5)."""
        views = {
            "x_views_train": view_features(features, self.views_train),
            "x_views_val": view_features(features, self.views_val),
        }
        if features == DEFAULT_FEATURES:  # x is gap5 already (a set built without taps too)
            return dataclasses.replace(self, **views) if self.views_train else self
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
            **views,
        )

    def pooled_views(self) -> np.ndarray | None:
        """The selected choice's views of train then val rows, or None without views."""
        if self.x_views_train is None or self.x_views_val is None:
            return None
        return np.concatenate([self.x_views_train, self.x_views_val])

    def pooled(self) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
        """x, y and units of train then val rows, which cross-validation folds (search.folds)."""
        units = (self.units_train or self.sha256_train) + (self.units_val or self.sha256_val)
        if len(units) != len(self.y_train) + len(self.y_val):  # built without hashes (tests)
            units = tuple(str(i) for i in range(len(self.y_train) + len(self.y_val)))
        x = np.concatenate([self.x_train, self.x_val])
        return x, np.concatenate([self.y_train, self.y_val]), units

    @property
    def identity(self) -> dict[str, str]:
        """The cache and split these features come from, as the study and its runs record them."""
        return {"feature_fingerprint": self.fingerprint, "split_digest": self.split_digest}


def view_features(features: str, views: dict[str, np.ndarray]) -> np.ndarray | None:
    """(n, K, features_dim) of a features choice from its taps' views, or None when not every
    tap it reads has views. A view is already randomly mirrored, so a `_flipavg` term reads the
    view of its tap alone (emotr.data.augment)."""
    terms = parse_features(features)
    if not views or any(term.tap not in views for term in terms):
        return None
    n_views = next(iter(views.values())).shape[1]
    per_view = []
    for k in range(n_views):
        taps = {term.tap: views[term.tap][:, k] for term in terms}
        taps |= {tap + FLIP_SUFFIX: value for tap, value in taps.items()}
        per_view.append(combine_features(features, taps))
    return np.stack(per_view, axis=1)


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
    root: str,
    tune: TuneConfig,
    listing: Listing,
    fingerprint: str,
    failed: Collection[str] = (),
    n_views: int = 0,
) -> FeatureSet:
    """Cached features and labels of the listing's train and val images, from the folder
    `fingerprint` under the cache `root` (and its taps' folders that `tune` reads).

    Args:
        failed: sha256 of images the extraction that just ran could not decode; they are left out
            with a warning. Any other listed image missing from the cache is an error (run
            `emotr extract` first) unless tune.allow_partial_cache is set.
        n_views: extract.views; the views of the searched taps are loaded when a trial may
            train on them (train_views in tune.baseline or the search space).
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
        groups = rows["group"] if "group" in rows else rows["sha256"]
        units = tuple(groups.where(groups.notna(), rows["sha256"]).astype(str))
        parts[split] = (taps, rows["label"].to_numpy(np.int32), tuple(keys), units)
    views = {split: {} for split in parts}
    if n_views and True in tune.searched("train_views"):
        unflipped = [tap for tap in caches if not tap.endswith(FLIP_SUFFIX)]
        for split, part in parts.items():
            views[split] = {
                tap: load_views(root, fingerprint, tap, n_views, part[2]) for tap in unflipped
            }
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
        units_train=parts["train"][3],
        units_val=parts["val"][3],
        views_train=views["train"],
        views_val=views["val"],
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
