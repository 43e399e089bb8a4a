"""The registered challenger's numbers on the test split: the split its search never read.

The search picks the best of many trials by validation AUC, so that number is optimistic; the
test split (data.test_fraction) was held out of every trial, of early stopping and of the choice,
so the version's AUC there is what a paper's test number compares with. Scored from the cached
features (emotr.deploy.promote.score_images), with a percentile bootstrap interval.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from emotr.config import Config
from emotr.deploy.promote import score_images
from emotr.deploy.registry import fluent_store, tag_version
from emotr.search.metrics import bootstrap_auc, evaluate
from emotr.track import Tracker

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TestScore:
    """A version's numbers on the test split: AUC (macro for K > 2) with its 95 % interval."""

    n_images: int
    auc: float
    low: float
    high: float
    accuracy: float
    balanced_accuracy: float
    metrics: dict[str, float]  # every test_* number, per class too

    def describe(self) -> str:
        """One line: the AUC, its interval, accuracy and balanced accuracy, on how many images."""
        return (
            f"test AUC {self.auc:.4f} (95 % interval {self.low:.4f}-{self.high:.4f}), accuracy "
            f"{self.accuracy:.4f}, balanced accuracy {self.balanced_accuracy:.4f} on "
            f"{self.n_images} images"
        )


def score_test_split(
    cfg: Config, tracker: Tracker, version: ModelVersion, images: pd.DataFrame
) -> TestScore | None:
    """Score `version` on the test `images` (path, sha256, label); None when they cannot give an
    AUC (fewer than two classes among the images it could score), with a warning."""
    return numbers_of(cfg, images, score_images(cfg, tracker, version, images))


def score_trial_on_test(
    cfg: Config,
    tracker: Tracker,
    run_id: str,
    features: str,
    fingerprint: str,
    images: pd.DataFrame,
) -> TestScore | None:
    """A trial's head (its run's `model`) on the test `images`, from their cached features: the
    peer's and the recipe's test numbers beside the registered version's, on the same images."""
    import mlflow.keras  # a trial's logged Keras head; imported by the caller's `emotr run` only

    from emotr.search.head import predict_proba
    from emotr.search.training_set import tap_caches
    from emotr.taps import combine_features, taps_of

    with fluent_store(tracker):
        head = mlflow.keras.load_model(f"runs:/{run_id}/model")
    keys = images["sha256"].tolist()
    caches = tap_caches(cfg.cache.root, fingerprint, taps_of(features))
    x = combine_features(features, {tap: cache.load(keys) for tap, cache in caches.items()})
    return numbers_of(cfg, images, predict_proba(head, x))


def numbers_of(cfg: Config, images: pd.DataFrame, proba: np.ndarray) -> TestScore | None:
    """The TestScore of (n, K) probabilities of the `images` (NaN rows: not scorable); None when
    they cannot give an AUC."""
    usable = np.isfinite(proba).all(axis=1)
    labels = images["label"].to_numpy()[usable]
    if len(np.unique(labels)) < 2:
        log.warning(
            "the test split has %d scorable image(s) of %d class(es): no test AUC; raise "
            "data.test_fraction or add images",
            int(usable.sum()),
            len(np.unique(labels)),
        )
        return None
    numbers = evaluate(labels, proba[usable], cfg.data.classes, prefix="test_")
    auc, low, high = bootstrap_auc(
        labels,
        proba[usable],
        n_resamples=cfg.registry.bootstrap_samples,
        seed=cfg.registry.bootstrap_seed,
    )
    numbers |= {"test_auc_low": low, "test_auc_high": high, "n_test_images": float(len(labels))}
    return TestScore(
        n_images=len(labels),
        auc=auc,
        low=low,
        high=high,
        accuracy=numbers["test_accuracy"],
        balanced_accuracy=numbers["test_balanced_accuracy"],
        metrics=numbers,
    )


def tag_test_score(tracker: Tracker, version: ModelVersion, score: TestScore) -> None:
    """The test numbers as tags of the version (the registry's UI shows tags, not metrics)."""
    names = ("test_auc", "test_auc_low", "test_auc_high", "test_accuracy")
    tags = {name: f"{score.metrics[name]:.6f}" for name in names}
    tags["test_balanced_accuracy"] = f"{score.balanced_accuracy:.6f}"
    tags["n_test_images"] = str(score.n_images)
    tag_version(tracker, version, tags)
