"""The features a search trains on: one cache's train/val matrices, checked, with their identity.

A leaf module: the search driver (emotr.tune) and its trial tasks (emotr.trial) both use it.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import pandas as pd

from emotr.cache import FeatureCache
from emotr.config import Config
from emotr.data import Listing
from emotr.errors import EmotrError

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

    def __post_init__(self) -> None:
        check_shapes(self)

    @property
    def identity(self) -> dict[str, str]:
        """The cache and split these features come from, as the study and its runs record them."""
        return {"feature_fingerprint": self.fingerprint, "split_digest": self.split_digest}


def check_shapes(features: FeatureSet) -> None:
    """x is (n, d) and y (n,) with both labels, in each split; both splits have the same d."""
    for name in ("train", "val"):
        x, y = getattr(features, f"x_{name}"), getattr(features, f"y_{name}")
        if x.ndim != 2 or len(x) != len(y):
            raise FeatureError(f"x_{name} {x.shape} and y_{name} {y.shape} must be (n, d) and (n,)")
        if set(np.unique(y).tolist()) != {0, 1}:
            raise FeatureError(
                f"y_{name} must hold both labels 0 and 1, got {np.unique(y).tolist()}"
            )
    if features.x_train.shape[1] != features.x_val.shape[1]:
        raise FeatureError(
            f"train has {features.x_train.shape[1]} features, val {features.x_val.shape[1]}"
        )


def load_feature_set(
    cfg: Config, listing: Listing, fingerprint: str, failed: Collection[str] = ()
) -> FeatureSet:
    """Cached features and labels of the listing's train and val images.

    Args:
        failed: sha256 of images the extraction that just ran could not decode; they are left out
            with a warning. Any other listed image missing from the cache is an error (run
            `emotr extract` first) unless tune.allow_partial_cache is set.
    """
    cache = FeatureCache.open(cfg.cache.root, fingerprint)
    cached = listing.images["sha256"].isin(cache.cached_hashes())
    images = listing.images[cached]
    _check_missing(cfg, listing.images[~cached], set(failed), fingerprint, len(images))
    parts = {}
    for split in ("train", "val"):
        rows = images[images["split"] == split]
        if rows["label"].nunique() < 2:
            raise FeatureError(
                f"the {split} split has cached images of fewer than two classes; add images "
                f"(data.root) or change data.val_fraction"
            )
        parts[split] = (cache.load(rows["sha256"].tolist()), rows["label"].to_numpy(np.int32))
    return FeatureSet(
        x_train=parts["train"][0],
        y_train=parts["train"][1],
        x_val=parts["val"][0],
        y_val=parts["val"][1],
        fingerprint=fingerprint,
        split_digest=listing.digest,
    )


def _check_missing(
    cfg: Config, missing: pd.DataFrame, failed: set[str], fingerprint: str, n_cached: int
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
    if n_cached == 0 or not cfg.tune.allow_partial_cache:
        raise FeatureError(
            f"{message} (or set tune.allow_partial_cache=true to tune on the cached ones)"
        )
    log.warning("%s; tune.allow_partial_cache is set: tuning without them", message)
