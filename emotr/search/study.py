"""The Optuna study of a search: open it, propose head params, count trials, settle the lost ones.

Resume: re-running with the same study name continues it. The driver logs a finished trial to
MLflow before it tells Optuna, so a trial a dead driver left RUNNING is settled from its MLflow run:
told if it was fully logged, else failed (Optuna and MLflow) and its parameters enqueued again, as
are trials whose Ray task was lost (worker or node died) -- up to tune.max_lost_retries times each.
A trial whose code raised is failed and not retried: the same parameters would raise again.

Several drivers may share a study. Each holds a lease on its RUNNING trials: the user attribute
`heartbeat`, renewed every tune.trial_heartbeat_s. Only a trial whose lease is STALE_HEARTBEATS
intervals old counts as left behind by a dead driver and is settled (Optuna's own heartbeat needs
optimize(); emotr asks and tells).

A trial's MLflow run carries the tags below, so its study and number can be found again.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from emotr.config import TuneConfig
from emotr.errors import EmotrError
from emotr.hyperparams import CategoricalSpace, FloatSpace, HeadParams, IntSpace, ParamSpace
from emotr.redaction import redact
from emotr.track import Tracker

STUDY_TAG = "optuna.study_name"
TRIAL_TAG = "optuna.trial_number"
STATE_TAG = "optuna.state"
ROLE_TAG = "emotr.role"
# Starts the `error` of a trial run whose task died with its worker or node (as opposed to one
# whose code raised): such a trial is retried.
LOST_PREFIX = "lost: "
# Starts the `error` of a trial run cancelled for running past tune.trial_timeout_s.
TIMEOUT_PREFIX = "timeout: "
# A trial's user attributes: the driver's lease on it (time.time() of the last renewal), and why
# it failed: "raised" (its code), "timeout" (tune.trial_timeout_s) or "lost" (worker/driver died).
LEASE_ATTR = "heartbeat"
FAILURE_ATTR = "failure"
ERROR_ATTR = "error"
# The peer trial's mark, and the full head params of a fixed trial (suggest_params uses them).
PEER_ATTR = "peer"
FIXED_ATTR = "fixed_params"
PEER_UPDATE = {
    "n_layers": 0,
    "standardize": True,
    "solver": "logreg_cv",
    "features": "gap5",
    "class_weight": False,
    "early_stopping": False,
    "train_views": False,
    "finetune": False,
}
# A lease this many renewal intervals old belongs to a dead driver.
STALE_HEARTBEATS = 3


class StudyError(EmotrError, ValueError):
    """A study that cannot be used for this search; the message says which tune key to change."""


class StorageError(EmotrError, RuntimeError):
    """tune.storage cannot be opened; the message names it (without its password) and the cause."""


def check_storage(tune: TuneConfig) -> None:
    """Open tune.storage once (creating a local SQLite file's folder); an error names the cause.

    Meant to run before extraction, so that an unreachable study database fails in seconds.
    """
    try:
        _make_sqlite_folder(tune.storage)
        kwargs = _engine_kwargs(tune.storage)
        storage = optuna.storages.RDBStorage(tune.storage, engine_kwargs=kwargs)
    except Exception as error:  # any driver, network or file error: all mean the same to a user
        cause = redact(f"{type(error).__name__}: {error}")
        raise StorageError(
            f"tune.storage {redact(tune.storage)} cannot be opened: {cause}"
        ) from None
    storage.engine.dispose()


def _make_sqlite_folder(url: str) -> None:
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)


def _engine_kwargs(url: str) -> dict[str, Any]:
    # A firewalled database host would otherwise hang for the OS's TCP timeout (minutes).
    if url.startswith(("postgresql", "mysql")):
        return {"connect_args": {"connect_timeout": 10}}
    return {}


def open_study(tune: TuneConfig) -> optuna.Study:
    """Create or load the study (a local SQLite file gets its folder)."""
    _make_sqlite_folder(tune.storage)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in RDB"
    try:
        study = optuna.create_study(
            study_name=tune.study_name,
            storage=tune.storage,
            direction="maximize",
            load_if_exists=True,
        )
    finally:
        optuna.logging.set_verbosity(verbosity)
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise StudyError(
            f"study {tune.study_name!r} in {redact(tune.storage)} minimizes; "
            "pick another tune.study_name"
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
        raise StudyError(
            f"study {study.study_name!r} was run on features {recorded}, not {identity}; "
            "use a new tune.study_name for new features"
        )


def suggest_params(trial: optuna.Trial, tune: TuneConfig) -> HeadParams:
    """Head params of a trial: the search space's suggestions, the rest from tune.baseline.

    An enqueued value outside the space is used for the trial but not told to Optuna, which
    cannot represent it: the baseline's l2=0 against a log-scale range, and its he_normal and
    early_stopping=false against the searched trials' one-choice entries.
    """
    enqueued = trial.user_attrs.get("enqueued_params", {})
    # A fixed trial (the peer) brings every head param; the others start from the baseline.
    params = dict(trial.user_attrs.get(FIXED_ATTR) or tune.baseline.model_dump())
    for name, space in tune.search_space.items():
        if name in enqueued and not _inside(space, enqueued[name]):
            params[name] = enqueued[name]
        else:
            params[name] = _suggest(trial, name, space)
    return HeadParams.model_validate(params)


def _suggest(trial: optuna.Trial, name: str, space: ParamSpace) -> Any:
    if isinstance(space, CategoricalSpace):
        return trial.suggest_categorical(name, list(space.choices))
    if isinstance(space, IntSpace):
        return trial.suggest_int(name, space.low, space.high, step=space.step, log=space.log)
    assert isinstance(space, FloatSpace)
    return trial.suggest_float(name, space.low, space.high, step=space.step, log=space.log)


def _inside(space: ParamSpace, value: Any) -> bool:
    if isinstance(space, CategoricalSpace):
        return value in space.choices
    return (not space.log or value > 0) and space.low <= value <= space.high


def enqueue_baseline(study: optuna.Study, tune: TuneConfig) -> None:
    """Enqueue tune.baseline as a trial, unless the study already holds it."""
    params = {name: getattr(tune.baseline, name) for name in tune.search_space}
    for trial in study.get_trials(deepcopy=False):
        if trial.user_attrs.get("baseline") and trial.user_attrs.get("enqueued_params") == params:
            return
    _enqueue(study, params, baseline=True)


def peer_params(tune: TuneConfig) -> HeadParams:
    """The plain peer: standardised gap5 (the tutorial's features) and a linear head fitted by
    scikit-learn's LogisticRegressionCV (emotr.search.logreg), its L2 chosen by inner CV."""
    return tune.baseline.model_copy(update=PEER_UPDATE)


def enqueue_peer(study: optuna.Study, tune: TuneConfig) -> None:
    """Enqueue the plain peer as a fixed trial (tune.peer), unless the study holds it already."""
    if not tune.peer:
        return
    peer = peer_params(tune)
    params = {name: getattr(peer, name) for name in tune.search_space}
    fixed = peer.model_dump()
    for trial in study.get_trials(deepcopy=False):
        if trial.user_attrs.get(PEER_ATTR) and trial.user_attrs.get(FIXED_ATTR) == fixed:
            return
    _enqueue(study, params, **{PEER_ATTR: True, FIXED_ATTR: fixed})


def _enqueue(study: optuna.Study, params: dict[str, Any], **attrs: Any) -> None:
    study.enqueue_trial(params, user_attrs={**attrs, "enqueued_params": params})


def n_counted(trials: list[FrozenTrial]) -> int:
    """Finished trials that count toward tune.n_trials (a lost trial enqueued again does not)."""
    retried = {trial.user_attrs["retry_of"] for trial in trials if "retry_of" in trial.user_attrs}
    return sum(trial.state.is_finished() and trial.number not in retried for trial in trials)


@dataclass(frozen=True)
class TrialCounts:
    """The trials of a study by outcome; they add up to the trials made."""

    n_complete: int
    n_pruned: int
    n_failed: int  # its own code raised, or it ran past tune.trial_timeout_s
    n_lost: int  # its worker, node or driver died (each retried up to tune.max_lost_retries)
    n_running: int
    n_waiting: int  # enqueued, not started yet (retries of lost trials, the baseline)

    @property
    def n_made(self) -> int:
        """Every trial of the study."""
        return sum(asdict(self).values())

    def as_metrics(self) -> dict[str, float]:
        """The counts as MLflow metrics of the `tune` run."""
        return {key: float(value) for key, value in asdict(self).items()}


def count_trials(trials: list[FrozenTrial]) -> TrialCounts:
    """Count a study's trials by state, failed ones by why they failed."""
    failed = [trial for trial in trials if trial.state == TrialState.FAIL]
    n_lost = sum(trial.user_attrs.get(FAILURE_ATTR) == "lost" for trial in failed)
    states = [trial.state for trial in trials]
    return TrialCounts(
        n_complete=states.count(TrialState.COMPLETE),
        n_pruned=states.count(TrialState.PRUNED),
        n_failed=len(failed) - n_lost,
        n_lost=n_lost,
        n_running=states.count(TrialState.RUNNING),
        n_waiting=states.count(TrialState.WAITING),
    )


def complete_curves(study: optuna.Study) -> list[tuple[float, dict[int, float]]]:
    """(value, val AUC by epoch) of the complete trials that stored their `val_auc_curve`."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return [
        (trial.value, dict(enumerate(trial.user_attrs["val_auc_curve"], start=1)))
        for trial in complete
        if "val_auc_curve" in trial.user_attrs
    ]


def fail_trial(
    study: optuna.Study, trial: optuna.Trial | FrozenTrial, failure: str, error: str
) -> None:
    """Tell Optuna a trial failed, recording why (FAILURE_ATTR) and its error text."""
    _set_attr(study, trial, FAILURE_ATTR, failure)
    _set_attr(study, trial, ERROR_ATTR, error[:500])
    study.tell(trial.number, state=TrialState.FAIL)


def fail_or_requeue(
    study: optuna.Study, trial: optuna.Trial | FrozenTrial, max_retries: int, error: str
) -> None:
    """Fail a lost trial; enqueue its params again unless it ran out of retries."""
    retries = trial.user_attrs.get("lost_retries", 0)
    if retries < max_retries:
        kept = ("baseline", PEER_ATTR, FIXED_ATTR)
        keep = {key: trial.user_attrs[key] for key in kept if key in trial.user_attrs}
        params = {**trial.user_attrs.get("enqueued_params", {}), **trial.params}
        _enqueue(study, params, **keep, lost_retries=retries + 1, retry_of=trial.number)
    fail_trial(study, trial, "lost", error)


def _set_attr(study: optuna.Study, trial: optuna.Trial | FrozenTrial, key: str, value: Any) -> None:
    if isinstance(trial, optuna.Trial):
        trial.set_user_attr(key, value)
    else:  # a FrozenTrial from get_trials: only the storage writes to it
        study._storage.set_trial_user_attr(trial._trial_id, key, value)


def renew_lease(trial: optuna.Trial) -> None:
    """Mark a trial as still driven (by this process) as of now."""
    trial.set_user_attr(LEASE_ATTR, time.time())


def is_stale(trial: FrozenTrial, heartbeat_s: float, now: float | None = None) -> bool:
    """Whether a trial's lease (without one: its start) is STALE_HEARTBEATS intervals old."""
    renewed = trial.user_attrs.get(LEASE_ATTR)
    if renewed is None:
        started = trial.datetime_start
        renewed = started.timestamp() if started is not None else 0.0
    now = time.time() if now is None else now
    return now - renewed > STALE_HEARTBEATS * heartbeat_s


def find_study_runs(tracker: Tracker, study_name: str) -> tuple[list[Any], dict[int, Any]]:
    """The study's `tune` runs (oldest first) and its trial runs by trial number."""
    runs = tracker.find_all_runs(f"tags.`{STUDY_TAG}` = '{study_name}'")
    parents = [run for run in runs if run.data.tags.get(ROLE_TAG) == "tune"]
    trials = {
        int(run.data.tags[TRIAL_TAG]): run for run in runs if run.data.tags.get(ROLE_TAG) == "trial"
    }
    return sorted(parents, key=lambda run: run.info.start_time), trials


def recover_trials(
    study: optuna.Study, tracker: Tracker, tune: TuneConfig, skip: Collection[int] = ()
) -> int:
    """Settle the RUNNING trials whose lease went stale from what their MLflow runs hold.

    The driver logs a trial to MLflow before telling Optuna, so a trial whose run is FINISHED was
    only not told; any other is failed (and requeued unless its own code raised). Trials in
    `skip` (this driver's own) and those whose lease is fresh (another live driver's) are left
    alone. Returns how many were settled.
    """
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    stale = [t for t in running if t.number not in skip and is_stale(t, tune.trial_heartbeat_s)]
    if not stale:
        return 0
    _, runs = find_study_runs(tracker, study.study_name)
    for trial in stale:
        _settle(study, tracker, tune, trial, runs.get(trial.number))
    return len(stale)


def _settle(
    study: optuna.Study, tracker: Tracker, tune: TuneConfig, trial: FrozenTrial, run: Any
) -> None:
    status = run.info.status if run is not None else None
    logged = run.data.tags.get(STATE_TAG) if run is not None else None
    error = run.data.tags.get("error", "") if run is not None else ""
    if status == "FINISHED" and logged == "COMPLETE":
        study.tell(trial.number, run.data.metrics["val_auc"])
    elif status == "FINISHED" and logged == "PRUNED":
        study.tell(trial.number, state=TrialState.PRUNED)
    elif status == "FAILED" and not error.startswith(LOST_PREFIX):
        fail_trial(study, trial, "timeout" if error.startswith(TIMEOUT_PREFIX) else "raised", error)
    else:
        reason = "stale: the driver running this trial stopped before it finished"
        fail_or_requeue(study, trial, tune.max_lost_retries, f"{LOST_PREFIX}{reason}")
        if status == "RUNNING":
            tracker.end_run(run.info.run_id, "FAILED", reason)
