"""What `emotr run` does with a finished search: the candidate it registers (the best trial, or
the ensemble of the best trials), that version's numbers on the test split beside the plain
peer's and the recipe's on the same images, and the promotion gate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from emotr.config import Config
from emotr.deploy.candidates import ensemble_candidate, trial_candidate
from emotr.deploy.evaluate import score_test_split, score_trial_on_test, tag_test_score
from emotr.deploy.package import Candidate
from emotr.deploy.promote import PromotionError, promote_challenger
from emotr.search.report import SearchResult
from emotr.search.training_set import FeatureSet
from emotr.track import Tracker

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion


def choose_candidate(
    cfg: Config,
    tracker: Tracker,
    search: SearchResult,
    features: FeatureSet,
    validation: pd.DataFrame,
    test: pd.DataFrame,
) -> Candidate:
    """The search's best trial, or the ensemble of its best trials when that scores higher."""
    best = trial_candidate(search, features, validation, test)
    return ensemble_candidate(cfg, tracker, search, features, best) or best


def score_registered(
    cfg: Config, tracker: Tracker, run_id: str, version: ModelVersion, test: pd.DataFrame
) -> str:
    """Score the registered version on the `test` images, log the numbers on the pipeline run
    and as tags of the version; what to print (or why there is no test number)."""
    if not len(test):
        tracker.set_tags(run_id, {"test": "none: data.test_fraction is 0"})
        return (
            "no test split (data.test_fraction=0): the validation AUC above was selected on the "
            "same images it reports, so it is optimistic"
        )
    score = score_test_split(cfg, tracker, version, test)
    if score is None:
        tracker.set_tags(run_id, {"test": "no AUC: the test split holds one class"})
        return "no test AUC: the test split's images hold one class (raise data.test_fraction)"
    tracker.log_metrics(run_id, score.metrics)
    tag_test_score(tracker, version, score)
    return score.describe()


def score_fixed_trials(
    cfg: Config,
    tracker: Tracker,
    run_id: str,
    search: SearchResult,
    test: pd.DataFrame,
    features: FeatureSet,
) -> str:
    """The plain peer's and the tutorial recipe's numbers on the test images the registered
    version was scored on (metrics peer_test_* and recipe_test_*): the peer's line, or ""."""
    if not len(test):
        return ""
    fixed = {"peer": search.complete_run_of("peer"), "recipe": search.complete_run_of("baseline")}
    if cfg.tune.baseline.finetune:  # its head takes activations, not cached features
        fixed["recipe"] = None
    lines = {}
    for name, trial_run in fixed.items():
        if trial_run is None:
            continue
        chosen = "gap5" if name == "peer" else cfg.tune.baseline.features
        score = score_trial_on_test(cfg, tracker, trial_run, chosen, features.fingerprint, test)
        if score is not None:
            tracker.log_metrics(run_id, {f"{name}_{k}": v for k, v in score.metrics.items()})
            lines[name] = score.describe()
    return lines.get("peer", "")


def run_gate(cfg: Config, tracker: Tracker) -> str | None:
    """The promotion gate ending `emotr run` (registry.auto_promote): its decision and why.

    A gate that cannot compare (no images both versions score, one class) leaves the champion
    where it is and says so; the registered version stays the challenger.
    """
    if not cfg.registry.auto_promote:
        return None
    try:
        return promote_challenger(cfg, tracker).decision.reason
    except PromotionError as error:
        return f"not promoted, the gate could not compare: {error}"
