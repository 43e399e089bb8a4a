"""The caches one extraction pass fills: each configured tap's features, the activation and the
augmented views of the unflipped taps (`<tap>_view<k>`, emotr.cache.views).

An image is complete when every one of them holds it; the pass extracts the incomplete ones
once, computing only the outputs some of them lack, and commits each output's new rows to its
own cache (rows already there are skipped: a new tap on a warm cache costs one pass, and the
outputs cached already are not rewritten). A view missing is one more forward pass of the image
(its augmented pixels), the views already cached are not computed.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from emotr.cache.activations import open_activation_cache
from emotr.cache.fingerprint import CacheKey
from emotr.cache.store import FeatureCache, open_tap
from emotr.cache.views import open_view
from emotr.taps import DEFAULT_TAP, view_output, view_taps


class CacheSet:
    """Output name (tap, view or activation) -> its cache; gap5's names the set."""

    def __init__(self, caches: Mapping[str, FeatureCache]):
        self.caches = dict(caches)
        self.base = self.caches[DEFAULT_TAP]

    @property
    def fingerprint(self) -> str:
        """gap5's fingerprint: the identity of the whole set."""
        return self.base.fingerprint

    def complete_hashes(self) -> pa.Array:
        """The images every output holds, as Arrow strings (listed once; commits keep it
        current); test membership with pyarrow.compute.is_in."""
        arrays = [cache.known_hash_array() for cache in self.caches.values()]
        complete = arrays[0]
        for other in arrays[1:]:
            complete = complete.filter(pc.is_in(complete, value_set=other))
        return complete

    def missing_outputs(self, sha256s: Collection[str], unknown: bool = False) -> list[str]:
        """The outputs some of `sha256s` lack; every output when files of unknown hash come."""
        if unknown:
            return list(self.caches)
        if not sha256s:  # nothing to extract: no need for the caches' Python sets
            return []
        wanted = set(sha256s)
        return [name for name, cache in self.caches.items() if not wanted <= cache.known_hashes()]

    def commit(
        self,
        sha256s: Sequence[str],
        values: Mapping[str, np.ndarray],
        heights: Sequence[int],
        widths: Sequence[int],
    ) -> int:
        """Commit each output's rows it lacks; returns the images new to at least one output."""
        caches = self._of(values).values()
        new = {key for key in sha256s if any(key not in c.known_hashes() for c in caches)}
        for name, cache in self._of(values).items():
            cache.commit(sha256s, values[name], heights, widths)
        return len(new)

    def _of(self, values: Mapping[str, np.ndarray]) -> dict[str, FeatureCache]:
        return {name: self.caches[name] for name in values}


def open_cache_set(
    key: CacheKey,
    taps: Sequence[str],
    activation: str | None,
    input_size: Sequence[int],
    n_views: int = 0,
) -> CacheSet:
    """The caches of `taps` (extract.taps), of `activation` (extract.cache_activation, or
    None) and of views 1..n_views of the unflipped taps (extract.views) beside the features
    of `key`."""
    caches: dict[str, FeatureCache] = {
        tap: open_tap(key.root, key.fingerprint, dict(key.inputs), tap) for tap in taps
    }
    for k in range(1, n_views + 1):
        for tap in view_taps(taps):
            caches[view_output(tap, k)] = open_view(key.root, key.fingerprint, key.inputs, tap, k)
    if activation is not None:
        caches[activation] = open_activation_cache(key, activation, input_size)
    return CacheSet(caches)
