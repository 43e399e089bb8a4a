"""A cache folder's identity: the fingerprint of everything that changes a feature.

The inputs (the extractor's identity and the decode rules: emotr.extract.fingerprint gathers
them from the config) are hashed as canonical JSON, so a changed setting writes to a new folder
and never mixes features. A tap other than gap5 has a folder of its own, fingerprinted by gap5's
inputs plus the tap's name and width; an activation likewise (emotr.cache.activations), and each
augmented view of a tap (emotr.cache.views): the tap's name and width, the view's number and the
augmentation's description.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from emotr.data.augment import AUGMENTATION
from emotr.taps import DEFAULT_TAP, parse_features, tap_dim, view_output

CACHE_FORMAT = "1"


@dataclass(frozen=True)
class CacheKey:
    """Where one job's features live: the cache root, gap5's fingerprint and what it hashes.

    Computed once per job (emotr.extract.fingerprint.cache_key) and handed down: every folder
    of the job (taps, the activation) derives from it.
    """

    root: str
    fingerprint: str
    inputs: Mapping[str, str] = field(hash=False)


def canonical_json(inputs: Mapping[str, str]) -> str:
    """The inputs as compact JSON with sorted keys: what a fingerprint hashes."""
    return json.dumps(dict(inputs), sort_keys=True, separators=(",", ":"))


def fingerprint_of(inputs: Mapping[str, str]) -> str:
    """First 16 hex digits of the sha256 of the inputs' canonical JSON."""
    return hashlib.sha256(canonical_json(inputs).encode()).hexdigest()[:16]


def fingerprint_inputs(extractor: Mapping[str, object], decode: Mapping[str, object]) -> dict:
    """The inputs of gap5's folder: the extractor's identity, the decode rules, the format."""
    inputs = {**extractor, **decode, "cache_format": CACHE_FORMAT}
    return {key: str(value) for key, value in inputs.items()}


def tap_inputs(inputs: Mapping[str, str], tap: str) -> dict[str, str]:
    """The inputs of one tap's folder, from those of gap5's (the cache's identity)."""
    if tap == DEFAULT_TAP:  # the cache as it always was: its fingerprint does not change
        return dict(inputs)
    return {**inputs, "tap": tap, "feature_dim": str(tap_dim(tap))}


def view_inputs(inputs: Mapping[str, str], tap: str, k: int) -> dict[str, str]:
    """The inputs of the folder of view `k` of a tap, from those of gap5's (the cache's identity).

    The augmentation's description (emotr.data.augment.AUGMENTATION: its version and settings)
    is hashed too: views made another way never land in the same folder.
    """
    view_output(tap, k)  # ValueError for a flipped tap or a view number out of range
    return {
        **inputs,
        "tap": tap,
        "feature_dim": str(tap_dim(tap)),
        "view": str(k),
        "augmentation": AUGMENTATION,
    }


def features_folder(fingerprint: str, inputs: Mapping[str, str], features: str) -> str | None:
    """The one folder holding exactly a `features` choice (a single tap), given gap5's
    fingerprint and inputs; None for choices that combine taps (gap4+gap5, gap5_flipavg),
    which no folder holds as they are."""
    terms = parse_features(features)
    if len(terms) > 1 or terms[0].flipavg:
        return None
    own = tap_inputs(inputs, terms[0].tap)
    return fingerprint if own == dict(inputs) else fingerprint_of(own)
