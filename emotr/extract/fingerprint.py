"""The feature cache's fingerprint of a configuration: the extractor's identity (backbone,
weights, input size, precision) and the decode rules, gathered here, where both are known.

A job computes it once (emotr.pipeline) and hands the CacheKey down; the cache room itself
only hashes the inputs it is given (emotr.cache.fingerprint).
"""

from __future__ import annotations

from emotr.cache.fingerprint import CacheKey, features_folder, fingerprint_inputs, fingerprint_of
from emotr.config import BackboneConfig, CacheConfig, DecodeConfig
from emotr.data.imageio import decode_rules
from emotr.extract.weights import extractor_inputs


def compute_fingerprint(
    backbone: BackboneConfig, decode: DecodeConfig
) -> tuple[str, dict[str, str]]:
    """The cache fingerprint and the inputs it hashes (extractor identity + decode rules)."""
    inputs = fingerprint_inputs(extractor_inputs(backbone), decode_rules(decode))
    return fingerprint_of(inputs), inputs


def cache_key(cache: CacheConfig, backbone: BackboneConfig, decode: DecodeConfig) -> CacheKey:
    """Where the features of this backbone and these decode rules live under cache.root."""
    fingerprint, inputs = compute_fingerprint(backbone, decode)
    return CacheKey(cache.root, fingerprint, inputs)


def features_fingerprint(
    backbone: BackboneConfig, decode: DecodeConfig, features: str
) -> str | None:
    """The one folder holding exactly a `features` choice (a single tap); None for choices that
    combine taps (gap4+gap5, gap5_flipavg), which no folder holds as they are."""
    return features_folder(*compute_fingerprint(backbone, decode), features)
