"""The Optuna study of a search: open it, propose head params, count trials, settle the lost ones.

Resume: re-running with the same study name continues it. The driver logs a finished trial to
MLflow before it tells Optuna, so a trial a dead driver left RUNNING is settled from its MLflow run:
told if it was fully logged, else failed (Optuna and MLflow) and its parameters enqueued again, as
are trials whose Ray task was lost (worker or node died) -- up to tune.max_lost_retries times each.
A trial whose code raised is failed and not retried: the same parameters would raise again.

A trial's MLflow run carries the tags below, so its study and number can be found again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from emotr.config import TuneConfig
from emotr.track import Tracker

STUDY_TAG = "optuna.study_name"
TRIAL_TAG = "optuna.trial_number"
STATE_TAG = "optuna.state"
ROLE_TAG = "emotr.role"
# Starts the `error` of a trial run whose task died with its worker or node (as opposed to one
# whose code raised): such a trial is retried.
LOST_PREFIX = "lost: "


def open_study(tune: TuneConfig) -> optuna.Study:
    """Create or load the study (a local SQLite file gets its folder)."""
    if tune.storage.startswith("sqlite:///"):
        Path(tune.storage.removeprefix("sqlite:///")).expanduser().parent.mkdir(
            parents=True, exist_ok=True
        )
    study = optuna.create_study(
        study_name=tune.study_name, storage=tune.storage, direction="maximize", load_if_exists=True
    )
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise ValueError(
            f"study {tune.study_name!r} in {tune.storage} minimizes; pick another tune.study_name"
        )
    # Offset the seed by the trials already there: a resumed study must not replay the random
    # start-up proposals it already ran.
    seed = tune.seed + len(study.get_trials(deepcopy=False))
    if tune.sampler == "tpe":
        study.sampler = optuna.samplers.TPESampler(seed=seed)
    else:
        study.sampler = optuna.samplers.RandomSampler(seed=seed)
    return study


def check_features(study: optuna.Study, identity: dict[str, str]) -> None:
    """A study scores one feature set: refuse to resume it on other features or another split."""
    recorded = {key: study.user_attrs.get(key) for key in identity}
    if all(value is None for value in recorded.values()):
        for key, value in identity.items():
            study.set_user_attr(key, value)
    elif recorded != identity:
        raise ValueError(
            f"study {study.study_name!r} was run on features {recorded}, not {identity}; "
            "use a new tune.study_name for new features"
        )


def suggest_params(trial: optuna.Trial, tune: TuneConfig) -> dict[str, Any]:
    """Head params of a trial: the search space's suggestions, the rest from tune.baseline.

    An enqueued value outside the space (the baseline's l2=0 against a log-scale range) is used
    for the trial but not told to Optuna, which cannot represent it.
    """
    enqueued = trial.user_attrs.get("enqueued_params", {})
    params = dict(tune.baseline)
    for name, spec in tune.search_space.items():
        if name in enqueued and not _inside(spec, enqueued[name]):
            params[name] = enqueued[name]
        else:
            params[name] = _suggest(trial, name, spec)
    return params


def _suggest(trial: optuna.Trial, name: str, spec: dict[str, Any]) -> Any:
    if spec["type"] == "categorical":
        return trial.suggest_categorical(name, list(spec["choices"]))
    if spec["type"] == "int":
        step = spec.get("step", 1)
        return trial.suggest_int(
            name, spec["low"], spec["high"], step=step, log=spec.get("log", False)
        )
    return trial.suggest_float(
        name, spec["low"], spec["high"], step=spec.get("step"), log=spec.get("log", False)
    )


def _inside(spec: dict[str, Any], value: Any) -> bool:
    if spec["type"] == "categorical":
        return value in spec["choices"]
    log_ok = not spec.get("log", False) or value > 0
    return log_ok and spec["low"] <= value <= spec["high"]


def enqueue_baseline(study: optuna.Study, tune: TuneConfig) -> None:
    """Enqueue tune.baseline as a trial, unless the study already holds it."""
    params = {name: tune.baseline[name] for name in tune.search_space if name in tune.baseline}
    for trial in study.get_trials(deepcopy=False):
        if trial.user_attrs.get("baseline") and trial.user_attrs.get("enqueued_params") == params:
            return
    _enqueue(study, params, baseline=True)


def _enqueue(study: optuna.Study, params: dict[str, Any], **attrs: Any) -> None:
    study.enqueue_trial(params, user_attrs={**attrs, "enqueued_params": params})


def n_counted(trials: list[optuna.trial.FrozenTrial]) -> int:
    """Finished trials that count toward tune.n_trials (a lost trial enqueued again does not)."""
    retried = {trial.user_attrs["retry_of"] for trial in trials if "retry_of" in trial.user_attrs}
    return sum(trial.state.is_finished() and trial.number not in retried for trial in trials)


def complete_curves(study: optuna.Study) -> list[tuple[float, dict[int, float]]]:
    """(value, val AUC by epoch) of the complete trials that stored their `val_auc_curve`."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return [
        (trial.value, dict(enumerate(trial.user_attrs["val_auc_curve"], start=1)))
        for trial in complete
        if "val_auc_curve" in trial.user_attrs
    ]


def fail_or_requeue(
    study: optuna.Study, trial: optuna.Trial | optuna.trial.FrozenTrial, max_retries: int
) -> None:
    """Fail a lost trial; enqueue its params again unless it ran out of retries."""
    retries = trial.user_attrs.get("lost_retries", 0)
    if retries < max_retries:
        keep = {key: trial.user_attrs[key] for key in ("baseline",) if key in trial.user_attrs}
        params = {**trial.user_attrs.get("enqueued_params", {}), **trial.params}
        _enqueue(study, params, **keep, lost_retries=retries + 1, retry_of=trial.number)
    study.tell(trial.number, state=TrialState.FAIL)


def find_study_runs(tracker: Tracker, study_name: str) -> tuple[list[Any], dict[int, Any]]:
    """The study's `tune` runs (oldest first) and its trial runs by trial number."""
    runs = tracker.find_all_runs(f"tags.`{STUDY_TAG}` = '{study_name}'")
    parents = [run for run in runs if run.data.tags.get(ROLE_TAG) == "tune"]
    trials = {
        int(run.data.tags[TRIAL_TAG]): run for run in runs if run.data.tags.get(ROLE_TAG) == "trial"
    }
    return sorted(parents, key=lambda run: run.info.start_time), trials


def recover_trials(
    study: optuna.Study, tracker: Tracker, runs: dict[int, Any], tune: TuneConfig
) -> None:
    """Settle the trials a dead driver left RUNNING from what their MLflow runs hold.

    The driver logs a trial to MLflow before telling Optuna, so a trial whose run is FINISHED was
    only not told; any other is failed (and requeued unless its own code raised).
    """
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        run = runs.get(trial.number)
        status = run.info.status if run is not None else None
        logged = run.data.tags.get(STATE_TAG) if run is not None else None
        if status == "FINISHED" and logged == "COMPLETE":
            study.tell(trial.number, run.data.metrics["val_auc"])
        elif status == "FINISHED" and logged == "PRUNED":
            study.tell(trial.number, state=TrialState.PRUNED)
        elif status == "FAILED" and not run.data.tags.get("error", "").startswith(LOST_PREFIX):
            study.tell(trial.number, state=TrialState.FAIL)
        else:
            fail_or_requeue(study, trial, tune.max_lost_retries)
            if status == "RUNNING":
                reason = "stale: the driver running this trial stopped before it finished"
                tracker.end_run(run.info.run_id, "FAILED", reason)
