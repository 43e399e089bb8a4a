"""The Optuna search over head hyperparameters: the driver owns the study, trials run as Ray tasks.

Only the driver touches the study (ask/tell) and MLflow: a worker trains a head on the shared
features and hands back its history, metrics, plots (PNG) and the packed MLflow model. So SQLite
Optuna and MLflow stores see one writer, and a local store behaves like a tracking server.

Resume: re-running with the same study name continues it. The driver logs a finished trial to
MLflow before it tells Optuna, so a trial a dead driver left RUNNING is settled from its MLflow run:
told if it was fully logged, else failed (Optuna and MLflow) and its parameters enqueued again, as
are trials whose Ray task was lost (worker or node died) -- up to tune.max_lost_retries times each.
A trial whose code raised is failed and not retried: the same parameters would raise again.

Pruning (tune.pruner=median) happens in the worker, without a round trip per epoch: the task gets
the val AUC curves of the trials complete at dispatch and asks Optuna's own MedianPruner, in an
in-memory study holding that snapshot, after every epoch. The driver stores each trial's curve as
the user attribute `val_auc_curve` (one write, where reporting 100 epochs took 100) for later
snapshots. Trials finishing while a trial runs are not in its snapshot.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import ray
from optuna.trial import TrialState
from rich.console import Console
from rich.live import Live
from rich.table import Table

from emotr import plots
from emotr.config import Config, TuneConfig, to_yaml
from emotr.head import HeadParams, fit_head
from emotr.track import MLFLOW_PARENT_RUN_ID, Tracker, keras_model_bytes

STUDY_TAG = "optuna.study_name"
TRIAL_TAG = "optuna.trial_number"
STATE_TAG = "optuna.state"
ROLE_TAG = "emotr.role"
# The numbers of the restored epoch, logged per trial and, prefixed best_, on the `tune` run.
FINAL_METRICS = ("val_auc", "val_accuracy", "val_precision", "val_recall", "val_f1")
FINAL_METRICS += ("val_log_loss", "best_epoch", "train_seconds")
# MedianPruner settings: compare only after this many complete trials and epochs (val AUC is noisy
# in the first epochs at the tutorial's learning rate).
_PRUNER_STARTUP_TRIALS = 5
_PRUNER_WARMUP_EPOCHS = 10
# A task that died with its worker or node, as opposed to one whose code raised.
_LOST_PREFIX = "lost: "
_LOST_ERRORS = (
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.NodeDiedError,
    ray.exceptions.LocalRayletDiedError,
    ray.exceptions.OutOfMemoryError,
    ray.exceptions.ObjectLostError,
)


@dataclass(frozen=True)
class FeatureSet:
    """Train/validation features of one cache, with the identity of the cache and of the split."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    fingerprint: str
    split_digest: str


@dataclass
class SearchResult:
    """What a search produced; `trials` has one row per trial of the study (all runs of it)."""

    study_name: str
    best_trial_number: int | None
    best_value: float | None
    best_params: dict[str, Any] | None
    best_run_id: str | None
    baseline_value: float | None
    n_complete: int
    n_failed: int
    n_pruned: int
    trials: pd.DataFrame
    parent_run_id: str
    wall_seconds: float


@dataclass(frozen=True)
class _TrialJob:
    """Everything a trial task needs besides the features."""

    params: dict[str, Any]
    epochs: int
    patience: int
    seed: int
    classes: tuple[str, ...]
    # (value, val AUC by epoch) of the trials complete at dispatch; None = no pruning.
    prune_against: list[tuple[float, dict[int, float]]] | None


@dataclass
class _Running:
    trial: optuna.Trial
    run_id: str
    dispatched: float = field(default_factory=time.time)


# ---------------------------------------------------------------------------------------- worker


def _train_trial(features: FeatureSet, job: _TrialJob) -> dict[str, Any]:
    """The Ray task: fit one head, render its plots, pack its MLflow model. No tracking calls."""
    started, cpu_started = time.time(), time.process_time()
    result = fit_head(
        HeadParams.from_dict(job.params),
        features.x_train,
        features.y_train,
        features.x_val,
        features.y_val,
        epochs=job.epochs,
        patience=job.patience,
        seed=job.seed,
        on_epoch_end=_pruning_check(job.prune_against),
    )
    n_epochs = len(result.history["val_auc"])
    pngs = {
        "plots/roc_curve.png": plots.roc_figure(*result.roc[:2], result.metrics["val_auc"]),
        "plots/confusion_matrix.png": plots.confusion_figure(result.confusion, job.classes),
        "plots/learning_curves.png": plots.learning_curves_figure(
            result.history, int(result.metrics["best_epoch"])
        ),
    }
    # A pruned head is never deployed: skip saving it.
    model = (
        None if result.stopped_by_callback else keras_model_bytes(result.model, features.x_val[:5])
    )
    return {
        "history": result.history,
        "metrics": {**result.metrics, "train_seconds": result.train_seconds},
        "n_epochs": n_epochs,
        "pruned": result.stopped_by_callback,
        "plots": {name: plots.to_png(figure) for name, figure in pngs.items()},
        "model": model,
        "started": started,
        "finished": time.time(),
        "cpu_seconds": time.process_time() - cpu_started,
    }


def _pruning_check(completed: list[tuple[float, dict[int, float]]] | None) -> Any:
    """An on_epoch_end asking MedianPruner about a snapshot of the study; None = no pruning."""
    if completed is None:
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # this worker's copy, not the driver's
    snapshot = optuna.create_study(
        direction="maximize",
        pruner=optuna.pruners.MedianPruner(
            n_startup_trials=_PRUNER_STARTUP_TRIALS, n_warmup_steps=_PRUNER_WARMUP_EPOCHS
        ),
    )
    snapshot.add_trials(
        [
            optuna.trial.create_trial(value=value, intermediate_values=steps)
            for value, steps in completed
        ]
    )
    trial = snapshot.ask()

    def check(epoch: int, logs: dict) -> bool:
        trial.report(logs["val_auc"], epoch)
        return trial.should_prune()

    return check


_train_trial_task = ray.remote(max_retries=0)(_train_trial)  # lost tasks are re-enqueued instead


# ---------------------------------------------------------------------------------------- study


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


def _enqueue(study: optuna.Study, params: dict[str, Any], **attrs: Any) -> None:
    study.enqueue_trial(params, user_attrs={**attrs, "enqueued_params": params})


def _enqueue_baseline(study: optuna.Study, tune: TuneConfig) -> None:
    params = {name: tune.baseline[name] for name in tune.search_space if name in tune.baseline}
    for trial in study.get_trials(deepcopy=False):
        if trial.user_attrs.get("baseline") and trial.user_attrs.get("enqueued_params") == params:
            return
    _enqueue(study, params, baseline=True)


def _n_counted(trials: list[optuna.trial.FrozenTrial]) -> int:
    """Finished trials that count toward tune.n_trials (a lost trial enqueued again does not)."""
    retried = {trial.user_attrs["retry_of"] for trial in trials if "retry_of" in trial.user_attrs}
    return sum(trial.state.is_finished() and trial.number not in retried for trial in trials)


def _fail_or_requeue(
    study: optuna.Study, trial: optuna.Trial | optuna.trial.FrozenTrial, max_retries: int
) -> bool:
    """Fail a lost trial; enqueue its params again unless it ran out of retries. True = requeued."""
    retries = trial.user_attrs.get("lost_retries", 0)
    requeue = retries < max_retries
    if requeue:
        keep = {key: trial.user_attrs[key] for key in ("baseline",) if key in trial.user_attrs}
        params = {**trial.user_attrs.get("enqueued_params", {}), **trial.params}
        _enqueue(study, params, **keep, lost_retries=retries + 1, retry_of=trial.number)
    study.tell(trial.number, state=TrialState.FAIL)
    return requeue


def _recover(study: optuna.Study, tracker: Tracker, runs: dict[int, Any], tune: TuneConfig) -> None:
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
        elif status == "FAILED" and not run.data.tags.get("error", "").startswith(_LOST_PREFIX):
            study.tell(trial.number, state=TrialState.FAIL)
        else:
            _fail_or_requeue(study, trial, tune.max_lost_retries)
            if status == "RUNNING":
                reason = "stale: the driver running this trial stopped before it finished"
                tracker.end_run(run.info.run_id, "FAILED", reason)


def _study_runs(tracker: Tracker, study_name: str) -> tuple[list[Any], dict[int, Any]]:
    """The study's `tune` runs (oldest first) and its trial runs by trial number."""
    runs = tracker.find_all_runs(f"tags.`{STUDY_TAG}` = '{study_name}'")
    parents = [run for run in runs if run.data.tags.get(ROLE_TAG) == "tune"]
    trials = {
        int(run.data.tags[TRIAL_TAG]): run for run in runs if run.data.tags.get(ROLE_TAG) == "trial"
    }
    return sorted(parents, key=lambda run: run.info.start_time), trials


def _open_parent(
    tracker: Tracker,
    existing: list[Any],
    cfg: Config,
    features: FeatureSet,
    parent_run_id: str | None,
) -> str:
    """The study's `tune` run under parent_run_id: reopened when resuming there, else created.

    Resuming inside another parent (a new pipeline run) starts a new `tune` run under it, so each
    pipeline run shows the trials it ran; the summary always covers the whole study.
    """
    same_parent = [
        run for run in existing if run.data.tags.get(MLFLOW_PARENT_RUN_ID) == parent_run_id
    ]
    if same_parent:
        run_id = same_parent[-1].info.run_id
        tracker.reopen_run(run_id)
        return run_id
    tags = {STUDY_TAG: cfg.tune.study_name, ROLE_TAG: "tune"}
    run_id = tracker.start_run("tune", parent_run_id, tags)
    tracker.log_params(
        run_id,
        {
            "study_name": cfg.tune.study_name,
            "feature_fingerprint": features.fingerprint,
            "split_digest": features.split_digest,
            "n_train": len(features.y_train),
            "n_val": len(features.y_val),
        },
    )
    return run_id


def _check_features(study: optuna.Study, features: FeatureSet) -> None:
    """A study scores one feature set: refuse to resume it on other features or another split."""
    identity = {"feature_fingerprint": features.fingerprint, "split_digest": features.split_digest}
    recorded = {key: study.user_attrs.get(key) for key in identity}
    if all(value is None for value in recorded.values()):
        for key, value in identity.items():
            study.set_user_attr(key, value)
    elif recorded != identity:
        raise ValueError(
            f"study {study.study_name!r} was run on features {recorded}, not {identity}; "
            "use a new tune.study_name for new features"
        )


def _is_lost(error: BaseException) -> bool:
    """True when a trial's task died with its worker or node rather than raising."""
    cause = error.cause if isinstance(error, ray.exceptions.RayTaskError) else error
    return isinstance(error, _LOST_ERRORS) or isinstance(cause, _LOST_ERRORS)


def _error_text(error: BaseException) -> str:
    cause = error.cause if isinstance(error, ray.exceptions.RayTaskError) else error
    return f"{type(cause).__name__}: {cause}".strip()


# ---------------------------------------------------------------------------------------- driver


class _Search:
    """The driver loop: ask -> dispatch as a Ray task -> wait -> log to MLflow -> tell."""

    def __init__(
        self,
        cfg: Config,
        study: optuna.Study,
        tracker: Tracker,
        features: FeatureSet,
        runs: dict[int, Any],
        parent_id: str,
    ):
        self.cfg, self.tune, self.study, self.tracker = cfg, cfg.tune, study, tracker
        self.features = features
        self.features_ref = ray.put(features)  # once; every task reads the same object
        self.runs, self.parent_id = runs, parent_id
        self.running: dict[ray.ObjectRef, _Running] = {}
        self.n_finishing = 0
        self.timings: dict[int, dict[str, float]] = {}
        threads = str(max(1, int(self.tune.cpus_per_trial)))
        # TensorFlow reads these when it starts in a worker; Ray reuses workers only among tasks
        # with the same runtime_env, so every trial worker keeps the pool size it started with.
        self.runtime_env = {
            "env_vars": {
                "TF_NUM_INTRAOP_THREADS": threads,
                "TF_NUM_INTEROP_THREADS": threads,
                "OMP_NUM_THREADS": threads,
                "TF_CPP_MIN_LOG_LEVEL": "2",
            }
        }
        self.live: Live | None = None

    def run(self) -> None:
        """Dispatch until tune.n_trials trials count as finished, keeping tune.concurrency busy."""
        try:
            self._refill()
            while self.running:
                ready, _ = ray.wait(list(self.running), num_returns=1)
                self._collect(ready[0])
        except BaseException:
            self._abort()
            raise

    def _n_wanted(self) -> int:
        counted = _n_counted(self.study.get_trials(deepcopy=False))
        return self.tune.n_trials - counted - len(self.running) - self.n_finishing

    def _refill(self) -> None:
        while len(self.running) < self.tune.concurrency and self._n_wanted() > 0:
            self._dispatch()
        self._show()

    def _dispatch(self) -> None:
        trial = self.study.ask()
        try:
            params = suggest_params(trial, self.tune)
            HeadParams.from_dict(params)  # a typo'd name fails here, not in every worker
        except Exception:
            self.study.tell(trial.number, state=TrialState.FAIL)
            raise
        trial.set_user_attr("head_params", params)
        run_id = self._trial_run(trial.number)
        trial.set_user_attr("mlflow_run_id", run_id)
        self.tracker.log_params(
            run_id,
            {
                **params,
                "feature_fingerprint": self.features.fingerprint,
                "split_digest": self.features.split_digest,
                "trial_number": trial.number,
            },
        )
        job = _TrialJob(
            params=params,
            epochs=self.tune.epochs,
            patience=self.tune.early_stopping_patience,
            seed=self.tune.seed,
            classes=tuple(self.cfg.data.classes),
            prune_against=self._pruning_snapshot(),
        )
        task = _train_trial_task.options(
            num_cpus=self.tune.cpus_per_trial,
            runtime_env=self.runtime_env,
            name=f"trial-{trial.number}",
        )
        self.running[task.remote(self.features_ref, job)] = _Running(trial, run_id)

    def _trial_run(self, number: int) -> str:
        existing = self.runs.get(number)
        if existing is not None and existing.info.status == "RUNNING":
            return existing.info.run_id
        tags = {STUDY_TAG: self.tune.study_name, TRIAL_TAG: str(number), ROLE_TAG: "trial"}
        run_id = self.tracker.start_run(f"trial-{number}", self.parent_id, tags)
        self.runs[number] = self.tracker.client.get_run(run_id)
        return run_id

    def _pruning_snapshot(self) -> list[tuple[float, dict[int, float]]] | None:
        if self.tune.pruner == "none":
            return None
        complete = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return [
            (trial.value, dict(enumerate(trial.user_attrs["val_auc_curve"], start=1)))
            for trial in complete
            if "val_auc_curve" in trial.user_attrs
        ]

    def _collect(self, ref: ray.ObjectRef) -> None:
        running = self.running.pop(ref)
        self.n_finishing += 1  # not running, not told yet: still holds its place in n_trials
        try:
            try:
                payload = ray.get(ref)
            except ray.exceptions.RayError as error:
                self._fail(running, error)
            else:
                self._complete(running, payload)
        finally:
            self.n_finishing -= 1
        self._refill()

    def _complete(self, running: _Running, payload: dict[str, Any]) -> None:
        """Log to MLflow, then tell Optuna: a crash in between is settled from MLflow on resume."""
        received = time.time()
        self._refill()  # keep the workers busy while this trial is logged
        trial, curve = running.trial, payload["history"]["val_auc"]
        state = TrialState.PRUNED if payload["pruned"] else TrialState.COMPLETE
        self._log(running, payload, state.name)
        logged = time.time()
        if self.tune.pruner != "none":
            # One write for the whole curve (trial.report per epoch cost ~3 ms each in SQLite).
            trial.set_user_attr("val_auc_curve", curve)
        if payload["pruned"]:
            trial.report(curve[-1], len(curve))  # a pruned trial's value is its last report
            self.study.tell(trial.number, state=TrialState.PRUNED)
        else:
            self.study.tell(trial.number, payload["metrics"]["val_auc"])
        self.timings[trial.number] = {
            "train_s": payload["metrics"]["train_seconds"],
            "task_s": payload["finished"] - payload["started"],
            "queue_s": payload["started"] - running.dispatched,
            "return_s": received - payload["finished"],
            "log_s": logged - received,
            "tell_s": time.time() - logged,
            "total_s": time.time() - running.dispatched,
            "cpu_s": payload["cpu_seconds"],
        }

    def _fail(self, running: _Running, error: ray.exceptions.RayError) -> None:
        self._refill()
        lost = _is_lost(error)
        self.tracker.log_text(running.run_id, str(error), "error.txt")
        self.tracker.set_tags(running.run_id, {STATE_TAG: "FAIL"})
        text = f"{_LOST_PREFIX}{_error_text(error)}" if lost else _error_text(error)
        self.tracker.end_run(running.run_id, "FAILED", text)
        if lost:
            _fail_or_requeue(self.study, running.trial, self.tune.max_lost_retries)
        else:
            self.study.tell(running.trial.number, state=TrialState.FAIL)

    def _log(self, running: _Running, payload: dict[str, Any], state: str) -> None:
        run_id = running.run_id
        self.tracker.log_history(run_id, payload["history"])
        # Like MLflow's Keras autologging: the restored (best) epoch's numbers are logged one step
        # after the last epoch, so the run's latest values are those of the model it keeps.
        self.tracker.log_metrics(run_id, payload["metrics"], step=payload["n_epochs"] + 1)
        for name, png in payload["plots"].items():
            self.tracker.log_bytes(run_id, png, name)
        if payload["model"] is not None:
            self.tracker.log_dir_bytes(run_id, payload["model"], "model")
        self.tracker.set_tags(run_id, {STATE_TAG: state})
        self.tracker.end_run(run_id)

    def _abort(self) -> None:
        """Interrupted or failed driver: stop its tasks; their trials re-run on resume."""
        for ref, running in self.running.items():
            ray.cancel(ref, force=True)
            _fail_or_requeue(self.study, running.trial, self.tune.max_lost_retries)
            self.tracker.end_run(running.run_id, "KILLED", "the search was interrupted")
        self.running.clear()

    def _show(self) -> None:
        if self.live is not None:
            self.live.update(_status_line(self.study, self.tune.n_trials, len(self.running)))


# --------------------------------------------------------------------------------------- summary


def _status_line(study: optuna.Study, n_trials: int, n_running: int) -> str:
    trials = study.get_trials(deepcopy=False)
    states = [trial.state for trial in trials]
    complete = [trial for trial in trials if trial.state == TrialState.COMPLETE]
    best = max(complete, key=lambda trial: trial.value, default=None)
    best_text = f"best val AUC {best.value:.4f} (trial {best.number})" if best else "no result yet"
    return (
        f"[bold]tune {study.study_name}[/]: {_n_counted(trials)}/{n_trials} done, "
        f"{states.count(TrialState.FAIL)} failed, {states.count(TrialState.PRUNED)} pruned, "
        f"{n_running} running - {best_text}"
    )


def _trials_frame(
    study: optuna.Study, runs: dict[int, Any], timings: dict[int, dict[str, float]]
) -> pd.DataFrame:
    """One row per trial: Optuna's columns, the full head params, the MLflow run id, timings."""
    frame = study.trials_dataframe(attrs=("number", "value", "state", "duration", "user_attrs"))
    head = pd.DataFrame(
        [trial.user_attrs.get("head_params", {}) for trial in study.get_trials(deepcopy=False)]
    )
    frame = pd.concat([frame, head.add_prefix("param_")], axis=1)
    frame = frame.drop(
        columns=[
            name
            for name in frame.columns
            if name
            in {"user_attrs_enqueued_params", "user_attrs_head_params", "user_attrs_val_auc_curve"}
        ]
    )
    frame["run_id"] = [runs[n].info.run_id if n in runs else None for n in frame["number"]]
    timing = pd.DataFrame.from_dict(timings, orient="index")
    return frame.join(timing, on="number") if not timing.empty else frame


def _log_optuna_plots(tracker: Tracker, run_id: str, study: optuna.Study, n_complete: int) -> None:
    import warnings

    from optuna.visualization import matplotlib as optuna_plots

    if n_complete == 0:
        return
    with warnings.catch_warnings():
        # Optuna warns about few trials per regime: expected early on, and not actionable.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)
        axes = optuna_plots.plot_optimization_history(study)
        tracker.log_figure(run_id, axes.figure, "plots/optimization_history.png")
        if n_complete < 2:
            tracker.set_tags(run_id, {"plots.param_importances": "skipped: < 2 complete trials"})
            return
        try:
            axes = optuna_plots.plot_param_importances(study)
        except (ValueError, RuntimeError) as error:  # e.g. every trial has the same params
            tracker.set_tags(run_id, {"plots.param_importances": f"skipped: {error}"})
            return
        tracker.log_figure(run_id, axes.figure, "plots/param_importances.png")


def _summarize(search: _Search, started: float) -> SearchResult:
    """Log the study's summary to its `tune` run and build the SearchResult."""
    study, tracker, parent = search.study, search.tracker, search.parent_id
    trials = study.get_trials(deepcopy=False)
    states = [trial.state for trial in trials]
    complete = [trial for trial in trials if trial.state == TrialState.COMPLETE]
    best = max(complete, key=lambda trial: trial.value, default=None)
    baseline = [trial for trial in complete if trial.user_attrs.get("baseline")]
    baseline_value = baseline[0].value if baseline else None
    best_run_id = search.runs[best.number].info.run_id if best else None
    counts = {
        "n_complete": len(complete),
        "n_failed": states.count(TrialState.FAIL),
        "n_pruned": states.count(TrialState.PRUNED),
    }
    summary: dict[str, float] = {key: float(value) for key, value in counts.items()}
    if best_run_id is not None:
        best_metrics = tracker.client.get_run(best_run_id).data.metrics
        summary.update(
            {f"best_{key}": best_metrics[key] for key in FINAL_METRICS if key in best_metrics}
        )
        tracker.set_tags(parent, {"best_run_id": best_run_id, "best_trial_number": best.number})
    if baseline_value is not None:
        summary["baseline_val_auc"] = baseline_value
    tracker.log_metrics(parent, summary)
    frame = _trials_frame(study, search.runs, search.timings)
    tracker.log_table(parent, frame, "trials.csv")
    tracker.log_text(parent, to_yaml(search.cfg), "config.yaml")
    _log_optuna_plots(tracker, parent, study, len(complete))
    tracker.end_run(parent)
    return SearchResult(
        study_name=study.study_name,
        best_trial_number=best.number if best else None,
        best_value=best.value if best else None,
        best_params=best.user_attrs.get("head_params") if best else None,
        best_run_id=best_run_id,
        baseline_value=baseline_value,
        trials=frame,
        parent_run_id=parent,
        wall_seconds=time.perf_counter() - started,
        **counts,
    )


def _top_table(result: SearchResult, n: int = 5) -> Table:
    table = Table(title=f"Top {n} trials of study {result.study_name!r}")
    columns = {
        "n_layers": "layers",
        "units": "units",
        "activation": "act",
        "dropout": "drop",
        "l2": "l2",
        "learning_rate": "lr",
        "batch_size": "batch",
        "standardize": "std",
        "class_weight": "cw",
    }
    for header in ["trial", "val AUC", *columns.values()]:
        table.add_column(header, justify="right")
    top = result.trials[result.trials["state"] == "COMPLETE"].nlargest(n, "value")
    for _, row in top.iterrows():
        values = [row.get(f"param_{name}") for name in columns]
        cells = [f"{value:.2g}" if isinstance(value, float) else str(value) for value in values]
        table.add_row(str(row["number"]), f"{row['value']:.4f}", *cells)
    return table


# ------------------------------------------------------------------------------------------ entry


def run_search(
    cfg: Config,
    features: FeatureSet,
    tracker: Tracker,
    parent_run_id: str | None = None,
    progress: bool = True,
) -> SearchResult:
    """Run (or resume) the study cfg.tune.study_name until cfg.tune.n_trials trials are finished.

    Needs a connected Ray (the caller runs ray.init). Logs one `tune` run per study (nested under
    parent_run_id when given) and one nested `trial-<n>` run per trial.
    """
    if not ray.is_initialized():
        raise RuntimeError("run_search needs Ray: call ray.init(...) first")
    _check_shapes(features)
    started = time.perf_counter()
    study = open_study(cfg.tune)
    _check_features(study, features)
    existing_parents, runs = _study_runs(tracker, cfg.tune.study_name)
    _recover(study, tracker, runs, cfg.tune)
    _enqueue_baseline(study, cfg.tune)
    parent_id = _open_parent(tracker, existing_parents, cfg, features, parent_run_id)
    search = _Search(cfg, study, tracker, features, runs, parent_id)
    console = Console()
    try:
        if progress:
            with Live(console=console, refresh_per_second=4) as search.live:
                search.run()
        else:
            search.run()
    except BaseException as error:
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        tracker.end_run(parent_id, status, f"{type(error).__name__}: {error}")
        raise
    finally:
        search.live = None
    result = _summarize(search, started)
    if progress:
        console.print(_top_table(result))
    return result


def _check_shapes(features: FeatureSet) -> None:
    for name in ("train", "val"):
        x, y = getattr(features, f"x_{name}"), getattr(features, f"y_{name}")
        if x.ndim != 2 or len(x) != len(y):
            raise ValueError(f"x_{name} {x.shape} and y_{name} {y.shape} must be (n, d) and (n,)")
        if set(np.unique(y).tolist()) != {0, 1}:
            raise ValueError(f"y_{name} must hold both labels 0 and 1, got {np.unique(y).tolist()}")
    if features.x_train.shape[1] != features.x_val.shape[1]:
        raise ValueError(
            f"train has {features.x_train.shape[1]} features, val {features.x_val.shape[1]}"
        )
