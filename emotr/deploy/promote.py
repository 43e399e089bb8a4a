"""The promotion gate: score challenger and champion on the same images, move `champion` or not.

The images are the challenger's recorded test split, which its search never read (its validation
split when it has none), or any listing given. A model whose
feature fingerprint has every image in the cache is scored from the cached features (seconds);
otherwise its own pyfunc decodes the files. Images that either model cannot score are left out
for both, so the comparison stays paired.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from emotr.config import Config
from emotr.deploy.gate import Comparison, Decision, compare_auc, decide
from emotr.deploy.registry import (
    TAPS_FINGERPRINT_TAG,
    find_version,
    get_version,
    load_evaluation_set,
    load_scorer,
    set_alias,
    tag_version,
    version_features,
)
from emotr.deploy.serving import probability_columns
from emotr.errors import EmotrError
from emotr.search.training_set import tap_caches
from emotr.track import Tracker

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

# Images per pyfunc call when a model decodes the files itself: bounds memory.
_CHUNK = 64


class PromotionError(EmotrError, RuntimeError):
    """The gate cannot compare the models (no images both could score, one class only)."""


@dataclass(frozen=True)
class Promotion:
    """What the gate did: the versions it compared, the numbers and the decision."""

    challenger: ModelVersion
    champion: ModelVersion | None  # the champion before the gate ran
    comparison: Comparison | None
    decision: Decision
    split: str = "test"  # which images: test | validation (the challenger's) | given (--data)

    @property
    def champion_version(self) -> str | None:
        """The version the champion alias points at after the gate."""
        if self.decision.promote:
            return str(self.challenger.version)
        return str(self.champion.version) if self.champion else None


def promote_challenger(
    cfg: Config,
    tracker: Tracker,
    *,
    min_delta: float | None = None,
    force: bool = False,
    images: pd.DataFrame | None = None,
) -> Promotion:
    """Run the gate on the challenger; `images` (path, sha256, label) replace its test set."""
    registry, name = cfg.registry, cfg.registry.model_name
    challenger = get_version(tracker, name, registry.challenger_alias)
    champion = find_version(tracker, name, registry.champion_alias)
    min_delta = registry.min_delta if min_delta is None else min_delta
    if champion is not None and champion.version == challenger.version:
        decision = Decision(False, f"version {challenger.version} is already the champion")
        return Promotion(challenger, champion, None, decision)
    comparison, split = None, "given"
    if champion is not None:
        if images is None:
            images, split = load_evaluation_set(tracker, challenger)
        comparison = _compare(cfg, tracker, challenger, champion, images)
    decision = decide(comparison, min_delta, force)
    if decision.promote:
        set_alias(tracker, name, registry.champion_alias, str(challenger.version))
    tags = _decision_tags(champion, comparison, decision)
    if comparison is not None:
        tags["promotion.split"] = split
    tag_version(tracker, challenger, tags)
    return Promotion(challenger, champion, comparison, decision, split)


def point_champion(cfg: Config, tracker: Tracker, version: str) -> ModelVersion:
    """Point the champion alias at `version` without the gate (rollback, or a chosen version)."""
    target = get_version(tracker, cfg.registry.model_name, version)
    set_alias(tracker, cfg.registry.model_name, cfg.registry.champion_alias, str(target.version))
    tag_version(tracker, target, {"promotion.decision": "set by --version"})
    return target


def _compare(
    cfg: Config,
    tracker: Tracker,
    challenger: ModelVersion,
    champion: ModelVersion,
    images: pd.DataFrame,
) -> Comparison:
    scores = [score_images(cfg, tracker, version, images) for version in (challenger, champion)]
    if scores[0].shape[1] != scores[1].shape[1]:
        raise PromotionError(
            f"version {challenger.version} scores {scores[0].shape[1]} classes, the champion "
            f"(version {champion.version}) {scores[1].shape[1]}: the gate compares models of the "
            "same classes; point the champion alias with `emotr promote --version N`"
        )
    usable = np.isfinite(scores[0]).all(axis=1) & np.isfinite(scores[1]).all(axis=1)
    labels = images["label"].to_numpy()[usable]
    if len(np.unique(labels)) < 2:
        raise PromotionError(
            f"{int(usable.sum())} of {len(images)} images could be scored by both versions and "
            "they do not hold both classes; pass --data with images of both classes"
        )
    return compare_auc(
        labels,
        scores[0][usable],
        scores[1][usable],
        n_resamples=cfg.registry.bootstrap_samples,
        seed=cfg.registry.bootstrap_seed,
    )


def score_images(
    cfg: Config, tracker: Tracker, version: ModelVersion, images: pd.DataFrame
) -> np.ndarray:
    """(n, K) class probabilities of each image by a version (NaN where it cannot decode the
    file)."""
    scorer = load_scorer(tracker, version)
    features = _cached_features(cfg, version, images["sha256"].tolist())
    if features is None and TAPS_FINGERPRINT_TAG in version.tags:
        features = _cached_taps(cfg, version, scorer.spec.taps, images["sha256"].tolist())
    if features is not None:
        return scorer.score_features(features)
    log.info("version %s: features not in the cache, decoding the images", version.version)
    paths, columns = images["path"].tolist(), probability_columns(scorer.spec.classes)
    chunks = [
        scorer.score(pd.DataFrame({"path": paths[start : start + _CHUNK]}))[columns]
        for start in range(0, len(paths), _CHUNK)
    ]
    if not chunks:
        return np.zeros((0, len(columns)))
    return np.concatenate([chunk.to_numpy(dtype=np.float64, na_value=np.nan) for chunk in chunks])


def _cached_features(cfg: Config, version: ModelVersion, sha256s: list[str]) -> np.ndarray | None:
    """The images' features from the cache of the version's fingerprint, if it holds them all."""
    cached = version_features(cfg.cache.root, version)
    if cached is None or not set(sha256s) <= cached.known:
        return None
    try:
        return cached.cache.load(sha256s)
    except (EmotrError, OSError, ValueError):  # an unreadable cache: decode instead
        return None


def _cached_taps(
    cfg: Config, version: ModelVersion, taps: Sequence[str], sha256s: list[str]
) -> dict[str, np.ndarray] | None:
    """An ensemble's taps of the images by name, from the cache beside its gap5 folder, if it
    holds them all (else None: decode)."""
    try:
        caches = tap_caches(cfg.cache.root, version.tags[TAPS_FINGERPRINT_TAG], taps)
        return {tap: cache.load(sha256s) for tap, cache in caches.items()}
    except (EmotrError, OSError, ValueError, KeyError):  # absent or unreadable: decode instead
        return None


def _decision_tags(
    champion: ModelVersion | None, comparison: Comparison | None, decision: Decision
) -> dict[str, str]:
    tags = {
        "promotion.decision": "promoted" if decision.promote else "not promoted",
        "promotion.reason": decision.reason[:5000],
        "promotion.compared_with": str(champion.version) if champion else "none",
    }
    if comparison is not None:
        tags |= {
            "promotion.auc_challenger": f"{comparison.auc_challenger:.6f}",
            "promotion.auc_champion": f"{comparison.auc_champion:.6f}",
            "promotion.delta_low": f"{comparison.low:.6f}",
            "promotion.delta_high": f"{comparison.high:.6f}",
            "promotion.n_images": str(comparison.n_images),
        }
    return tags
