"""Cached augmented views (extract.views): view k of a tap, per image, in a folder of its own.

Each (tap, view k) folder is a plain feature cache (Parquet parts keyed by sha256, written by the
extraction driver alone) fingerprinted by gap5's inputs plus the tap, the view's number and the
augmentation's description (emotr.cache.fingerprint.view_inputs). So raising extract.views from
2 to 4 adds the folders of views 3 and 4 and extracts only those, and `emotr cache ls/verify/gc/
compact` see view folders as caches of their own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from emotr.cache.fingerprint import fingerprint_of, view_inputs
from emotr.cache.store import CacheMiss, FeatureCache, read_inputs
from emotr.taps import tap_dim


class ViewsMissing(CacheMiss):
    """Augmented views asked for that the cache does not hold; the message says how to cache
    them (extract.views)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def open_view(
    root: str, fingerprint: str, inputs: Mapping[str, str], tap: str, k: int
) -> FeatureCache:
    """The cache of view `k` of `tap`, given gap5's fingerprint and inputs."""
    own = view_inputs(inputs, tap, k)
    return FeatureCache(root, fingerprint_of(own), own)


def view_fingerprint(inputs: Mapping[str, str], tap: str, k: int) -> str:
    """The folder of view `k` of `tap`, given gap5's inputs."""
    return fingerprint_of(view_inputs(inputs, tap, k))


def load_views(
    root: str, fingerprint: str, tap: str, n_views: int, sha256s: Sequence[str]
) -> np.ndarray:
    """Views 1..n_views of `tap`, float32 (n, n_views, dim) in the order of `sha256s`.

    `fingerprint` is gap5's (FeatureSet.fingerprint): the views' folders derive from its
    inputs. Raises ViewsMissing, naming extract.views, when a view of some image is not cached.
    """
    if n_views < 1:
        raise ValueError(f"n_views must be at least 1, got {n_views}")
    inputs = read_inputs(root, fingerprint)
    if not inputs:
        raise ViewsMissing(
            f"no features cached under {root}/{fingerprint}: run `emotr extract` with "
            f"extract.views: {n_views} first"
        )
    views = []
    for k in range(1, n_views + 1):
        cache = open_view(root, fingerprint, inputs, tap, k)
        try:
            views.append(cache.load(sha256s))
        except CacheMiss:
            raise ViewsMissing(
                f"view {k} of {tap} is not cached ({cache.location}) for some of the "
                f"{len(sha256s)} images; run `emotr extract` with extract.views: {n_views} (or "
                f"more) and {tap} in extract.taps"
            ) from None
    if not len(sha256s):
        return np.zeros((0, n_views, tap_dim(tap)), np.float32)
    return np.stack(views, axis=1)
