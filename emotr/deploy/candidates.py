"""What a search hands the registry: its best trial, or the greedy ensemble of its best trials
when that scores higher on the same cross-validated objective (emotr.search.ensemble).

An ensemble's deployable model is logged on a run of its own (`ensemble`, under the search's
`tune` run), holding the selection's numbers; its members' heads stay on their trial runs.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from emotr.config import Config
from emotr.deploy.package import Candidate, Member
from emotr.hyperparams import HeadParams
from emotr.search.ensemble import OOF_ARTIFACT, POOL_SIZE, EnsembleChoice, select_ensemble
from emotr.search.report import SearchResult
from emotr.search.study import ROLE_TAG, STUDY_TAG
from emotr.search.training_set import FeatureSet
from emotr.taps import features_dim
from emotr.track import Tracker

log = logging.getLogger(__name__)

ENSEMBLE_TAG = "emotr.ensemble_trials"


def usable_images(images: pd.DataFrame, failed: pd.Series) -> pd.DataFrame:
    """path, sha256, label of the images whose features the extraction has (not `failed`)."""
    images = images[~images["sha256"].isin(failed)]
    return images[["path", "sha256", "label"]].reset_index(drop=True)


def trial_candidate(
    search: SearchResult, features: FeatureSet, validation: pd.DataFrame, test: pd.DataFrame
) -> Candidate:
    """The search's best trial as a Candidate, with the images it was validated and tested on."""
    assert search.best_run_id is not None and search.best_params is not None
    head = HeadParams.model_validate(search.best_params)
    return Candidate(
        run_id=search.best_run_id,
        head=head,
        # The width of the head's own input: its features choice may combine taps.
        n_features=features.x_val.shape[1] if head.finetune else features_dim(head.features),
        feature_fingerprint=features.fingerprint,
        split_digest=features.split_digest,
        study=search.study_name,
        trial=search.best_trial_number,
        val_auc=search.best_value,
        validation=validation,
        test=test,
    )


def ensemble_candidate(
    cfg: Config, tracker: Tracker, search: SearchResult, features: FeatureSet, best: Candidate
) -> Candidate | None:
    """The greedy ensemble of the search's best trials as a Candidate, when it beats the best
    trial on the cross-validated objective (tune.ensemble_size > 1, tune.cv_folds > 1)."""
    if cfg.tune.ensemble_size < 2 or cfg.tune.cv_folds < 2:
        return None
    complete = search.trials[search.trials["state"] == "COMPLETE"]
    numbers = complete["number"].astype(int).tolist()
    values = dict(zip(numbers, complete["value"].astype(float).tolist(), strict=True))
    runs = dict(zip(numbers, complete["run_id"].tolist(), strict=True))
    oof = _out_of_fold(tracker, search, values, runs)
    choice = select_ensemble(oof, values, features.pooled()[1], cfg.tune.ensemble_size)
    if choice is None or choice.value <= (search.best_value or 0.0):
        return None
    members = tuple(_member(search, number, runs[number]) for number in choice.trials)
    run_id = _ensemble_run(tracker, search, choice)
    log.info(
        "ensemble of trials %s: cross-validated AUC %.4f, best single trial %.4f",
        ", ".join(map(str, choice.trials)),
        choice.value,
        search.best_value,
    )
    return Candidate(
        run_id=run_id,
        head=members[0].head,
        n_features=members[0].n_features,
        feature_fingerprint=best.feature_fingerprint,
        split_digest=best.split_digest,
        study=best.study,
        trial=members[0].trial,
        val_auc=choice.value,
        validation=best.validation,
        test=best.test,
        members=members,
    )


def _member(search: SearchResult, number: int, run_id: str) -> Member:
    row = search.trials[search.trials["number"] == number].iloc[0]
    params = {
        name.removeprefix("param_"): value.item() if isinstance(value, np.generic) else value
        for name, value in row.items()
        if name.startswith("param_") and not _missing(value)
    }
    head = HeadParams.model_validate(params)
    return Member(run_id=run_id, head=head, n_features=features_dim(head.features), trial=number)


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _out_of_fold(
    tracker: Tracker, search: SearchResult, values: dict[int, float], runs: dict[int, str]
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """(probabilities, folds) by trial: this driver's in memory, the others' from their runs."""
    oof = dict(search.oof)
    best = sorted(values, key=values.get, reverse=True)[:POOL_SIZE]
    for number in best:
        if number in oof or not isinstance(runs.get(number), str):
            continue
        try:
            path = tracker.client.download_artifacts(runs[number], OOF_ARTIFACT)
        except (MlflowException, OSError):  # a single-split or fine-tuning trial logs none
            continue
        with np.load(path) as saved:
            oof[number] = (saved["proba"], saved["folds"])
    return oof


def _ensemble_run(tracker: Tracker, search: SearchResult, choice: EnsembleChoice) -> str:
    """The `ensemble` run of these members under the search's tune run (reused when present)."""
    trials = json.dumps(list(choice.trials))
    existing = tracker.find_runs(
        f"tags.`{STUDY_TAG}` = '{search.study_name}' and tags.`{ROLE_TAG}` = 'ensemble' "
        f"and tags.`{ENSEMBLE_TAG}` = '{trials}'"
    )
    if existing:
        return existing[0].info.run_id
    tags = {STUDY_TAG: search.study_name, ROLE_TAG: "ensemble", ENSEMBLE_TAG: trials}
    run_id = tracker.start_run("ensemble", search.parent_run_id, tags)
    tracker.log_params(run_id, {"trials": trials, "n_members": len(choice.trials)})
    tracker.log_metrics(
        run_id,
        {
            "val_auc": choice.value,
            "val_auc_std": choice.value_std,
            "best_single_val_auc": choice.best_single,
        },
    )
    tracker.end_run(run_id)
    return run_id
