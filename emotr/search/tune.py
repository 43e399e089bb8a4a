"""The Optuna search over head hyperparameters: the driver owns the study, trials run as Ray tasks.

The driver loop asks the study for params, starts each trial as a Ray task (emotr.search.trial),
waits, logs what a task hands back to the trial's MLflow run, then tells the study -- in that order,
so a resumed study can settle from MLflow what a dead driver left (emotr.search.study). Only the
driver touches the study and MLflow. With tune.pruner=median the driver stores each trial's curve as
the user attribute `val_auc_curve` (one write, where reporting 100 epochs took 100) for the
snapshots later trials prune against.

While it waits, the driver renews the lease on its running trials, settles trials whose lease went
stale (their driver died), and cancels trials running past tune.trial_timeout_s.
"""

from __future__ import annotations

import io
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import ray
from optuna.trial import TrialState
from rich.console import Console
from rich.live import Live

from emotr.config import Config
from emotr.errors import EmotrError
from emotr.search.ensemble import OOF_ARTIFACT
from emotr.search.gpus import EPOCH_SECONDS, finetune_cost_line, trial_gpus
from emotr.search.report import (
    SearchResult,
    search_failure,
    status_line,
    summarize_search,
)
from emotr.search.study import (
    LOST_PREFIX,
    ROLE_TAG,
    STATE_TAG,
    STUDY_TAG,
    TIMEOUT_PREFIX,
    TRIAL_TAG,
    check_features,
    complete_curves,
    enqueue_baseline,
    enqueue_peer,
    fail_or_requeue,
    fail_trial,
    find_study_runs,
    n_counted,
    open_study,
    recover_trials,
    renew_lease,
    suggest_params,
)
from emotr.search.top_trials import top_table
from emotr.search.training_set import FeatureSet
from emotr.search.trial import TrialJob, TrialOutcome, submit_trial, task_failure
from emotr.track import MLFLOW_PARENT_RUN_ID, Tracker


def _npz(proba: np.ndarray, folds: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, proba=proba, folds=folds)
    return buffer.getvalue()


class SearchError(EmotrError, RuntimeError):
    """A search that produced no usable result; the message names the trials and their runs."""


def run_search(
    cfg: Config,
    features: FeatureSet,
    tracker: Tracker,
    parent_run_id: str | None = None,
    progress: bool = True,
) -> SearchResult:
    """Run (or resume) the study cfg.tune.study_name until cfg.tune.n_trials trials are finished.

    Needs a connected Ray (the caller runs ray.init). Logs one `tune` run per study (nested under
    parent_run_id when given) and one nested `trial-<n>` run per trial. Raises SearchError when no
    trial completed or fewer than tune.min_complete_fraction of tune.n_trials did.
    """
    if not ray.is_initialized():
        raise RuntimeError("run_search needs Ray: call ray.init(...) first")
    started = time.perf_counter()
    study = open_study(cfg.tune)
    check_features(study, features.identity)
    recover_trials(study, tracker, cfg.tune)
    enqueue_baseline(study, cfg.tune)
    enqueue_peer(study, cfg.tune)
    existing_parents, runs = find_study_runs(tracker, cfg.tune.study_name)
    parent_id = _open_parent(tracker, existing_parents, cfg, features, parent_run_id)
    search = _Search(cfg, study, tracker, features, runs, parent_id)
    # Off a terminal (a log, `ray job logs`) Rich assumes 80 columns: too narrow for the table.
    console = Console(width=None if sys.stdout.isatty() else 120)
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
    if progress:
        console.print()  # the live status line ends without a newline off a terminal
    result = summarize_search(cfg, study, tracker, parent_id, search.timings, started)
    failure = search_failure(result, cfg.tune)
    tracker.end_run(parent_id, "FAILED" if failure else "FINISHED", failure)
    result.oof = search.oof
    if progress:
        console.print(top_table(result))
        if cost := finetune_cost_line(result.trials, len(features.y_train)):
            console.print(cost, highlight=False)
    if failure:
        raise SearchError(failure)
    return result


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
            **features.identity,
            "n_train": len(features.y_train),
            "n_val": len(features.y_val),
        },
    )
    return run_id


@dataclass
class _Running:
    trial: optuna.Trial
    run_id: str
    dispatched: float = field(default_factory=time.time)


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
        self.next_beat = time.time() + self.tune.trial_heartbeat_s
        self.timings: dict[int, dict[str, float]] = {}
        self.cluster_gpus = ray.cluster_resources().get("GPU", 0.0)  # fine-tuning trials use them
        # Out-of-fold probabilities and folds of the cross-validated trials this driver ran.
        self.oof: dict[int, tuple[Any, Any]] = {}
        self.live: Live | None = None

    def run(self) -> None:
        """Dispatch until tune.n_trials trials count as finished, keeping tune.concurrency busy.

        Trials another live driver runs on the same study count toward n_trials: this loop waits
        for them to finish, or to go stale and be retried here.
        """
        try:
            self._refill()
            while self.running or self._n_others_running():
                self._wait()
                self._tick()
        except BaseException:
            self._abort()
            raise

    def _wait(self) -> None:
        timeout = max(0.0, min(self._next_deadline(), self.next_beat) - time.time())
        if not self.running:
            time.sleep(timeout)
            return
        ready, _ = ray.wait(list(self.running), num_returns=1, timeout=timeout)
        if ready:
            self._collect(ready[0])

    def _next_deadline(self) -> float:
        if self.tune.trial_timeout_s is None or not self.running:
            return float("inf")
        return min(r.dispatched for r in self.running.values()) + self.tune.trial_timeout_s

    def _tick(self) -> None:
        """Cancel overdue trials; every tune.trial_heartbeat_s renew leases, settle stale trials."""
        now = time.time()
        for ref, running in list(self.running.items()):
            if now - running.dispatched >= (self.tune.trial_timeout_s or float("inf")):
                self._time_out(ref)
        if now >= self.next_beat:
            for running in self.running.values():
                renew_lease(running.trial)
            own = {running.trial.number for running in self.running.values()}
            recover_trials(self.study, self.tracker, self.tune, skip=own)
            self.next_beat = now + self.tune.trial_heartbeat_s
        self._refill()

    def _n_others_running(self) -> int:
        own = {running.trial.number for running in self.running.values()}
        running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return sum(trial.number not in own for trial in running)

    def _refill(self) -> None:
        while len(self.running) < self.tune.concurrency and self._n_wanted() > 0:
            self._dispatch()
        if self.live is not None:
            self.live.update(status_line(self.study, self.tune.n_trials))

    def _n_wanted(self) -> int:
        # RUNNING trials (this driver's, another's, or stale ones about to be settled and
        # retried) hold their place in n_trials.
        trials = self.study.get_trials(deepcopy=False)
        n_running = sum(trial.state == TrialState.RUNNING for trial in trials)
        return self.tune.n_trials - n_counted(trials) - n_running

    def _dispatch(self) -> None:
        trial = self.study.ask()
        renew_lease(trial)
        try:
            params = suggest_params(trial, self.tune)
        except Exception as error:  # e.g. an enqueued value the head refuses
            fail_trial(self.study, trial, "raised", f"{type(error).__name__}: {error}")
            raise
        trial.set_user_attr("head_params", params.model_dump())
        run_id = self._trial_run(trial.number)
        trial.set_user_attr("mlflow_run_id", run_id)
        self.tracker.log_params(
            run_id, {**params.model_dump(), **self.features.identity, "trial_number": trial.number}
        )
        self._log_dataset(run_id)
        job = TrialJob(
            params=params,
            epochs=self.tune.epochs,
            patience=self.tune.early_stopping_patience,
            seed=self.tune.seed,
            classes=tuple(self.cfg.data.classes),
            prune_against=None if self.tune.pruner == "none" else complete_curves(self.study),
            pruner_startup_trials=self.tune.pruner_startup_trials,
            pruner_warmup_epochs=self.tune.pruner_warmup_epochs,
            cv_folds=0 if params.finetune else self.tune.cv_folds,
        )
        gpus = trial_gpus(self.tune, params.finetune, self.cluster_gpus)
        ref = submit_trial(self.features_ref, job, trial.number, self.tune.cpus_per_trial, gpus)
        self.running[ref] = _Running(trial, run_id)

    def _log_dataset(self, run_id: str) -> None:
        """The split a trial trains on, as the run's MLflow dataset (digest = split digest)."""
        data = self.cfg.data
        source = data.manifest or data.root
        features = self.features
        self.tracker.log_dataset(
            run_id,
            name=Path(source.rstrip("/")).name or "images",
            digest=features.split_digest,
            source=source,
            profile={
                **features.identity,
                "n_train": len(features.y_train),
                "n_val": len(features.y_val),
            },
        )

    def _trial_run(self, number: int) -> str:
        existing = self.runs.get(number)
        if existing is not None and existing.info.status == "RUNNING":
            return existing.info.run_id
        tags = {STUDY_TAG: self.tune.study_name, TRIAL_TAG: str(number), ROLE_TAG: "trial"}
        run_id = self.tracker.start_run(f"trial-{number}", self.parent_id, tags)
        self.runs[number] = self.tracker.client.get_run(run_id)
        return run_id

    def _collect(self, ref: ray.ObjectRef) -> None:
        running = self.running.pop(ref)
        try:
            outcome = ray.get(ref)
        except ray.exceptions.RayError as error:
            self._fail(running, error)
        else:
            self._complete(running, outcome)

    def _complete(self, running: _Running, outcome: TrialOutcome) -> None:
        """Log to MLflow, then tell Optuna: a crash in between is settled from MLflow on resume."""
        received = time.time()
        self._refill()  # keep the workers busy while this trial is logged
        trial, curve = running.trial, outcome.history["val_auc"]
        state = TrialState.PRUNED if outcome.pruned else TrialState.COMPLETE
        self._log(running.run_id, outcome, state.name)
        logged = time.time()
        if self.tune.pruner != "none":
            # One write for the whole curve (trial.report per epoch cost ~3 ms each in SQLite).
            trial.set_user_attr("val_auc_curve", curve)
        if outcome.oof_proba is not None:
            self.oof[trial.number] = (outcome.oof_proba, outcome.folds)
        if outcome.pruned:
            trial.report(curve[-1], len(curve))  # a pruned trial's value is its last report
            self.study.tell(trial.number, state=TrialState.PRUNED)
        else:
            self.study.tell(trial.number, outcome.val_auc)
        self.timings[trial.number] = {
            "train_s": outcome.metrics["train_seconds"],
            "task_s": outcome.finished - outcome.started,
            "queue_s": outcome.started - running.dispatched,
            "return_s": received - outcome.finished,
            "log_s": logged - received,
            "tell_s": time.time() - logged,
            "total_s": time.time() - running.dispatched,
            "cpu_s": outcome.cpu_seconds,
            "gpus": outcome.metrics.get("gpus", 0.0),
            EPOCH_SECONDS: outcome.metrics.get(EPOCH_SECONDS, float("nan")),  # fine-tuning only
        }

    def _log(self, run_id: str, outcome: TrialOutcome, state: str) -> None:
        self.tracker.log_history(run_id, outcome.history)
        # Like MLflow's Keras autologging: the restored (best) epoch's numbers are logged one step
        # after the last epoch, so the run's latest values are those of the model it keeps.
        self.tracker.log_metrics(run_id, outcome.metrics, step=outcome.n_epochs + 1)
        for name, png in outcome.plots.items():
            self.tracker.log_bytes(run_id, png, name)
        if outcome.model is not None:
            self.tracker.log_dir_bytes(run_id, outcome.model, "model")
        if outcome.oof_proba is not None:  # what a resumed search's ensemble selection reads
            self.tracker.log_bytes(run_id, _npz(outcome.oof_proba, outcome.folds), OOF_ARTIFACT)
        self.tracker.set_tags(run_id, {STATE_TAG: state})
        self.tracker.end_run(run_id)

    def _fail(self, running: _Running, error: ray.exceptions.RayError) -> None:
        self._refill()
        lost, text = task_failure(error)
        self.tracker.log_text(running.run_id, str(error), "error.txt")
        if lost:
            self._end_failed(running, f"{LOST_PREFIX}{text}")
            fail_or_requeue(self.study, running.trial, self.tune.max_lost_retries, text)
        else:
            self._end_failed(running, text)
            fail_trial(self.study, running.trial, "raised", text)

    def _time_out(self, ref: ray.ObjectRef) -> None:
        """Cancel a trial past tune.trial_timeout_s and fail it; the search goes on."""
        running = self.running.pop(ref)
        # force: a running task only stops when its worker is killed (its ray.get would then
        # read as a lost worker, so the ref is dropped here, never collected).
        ray.cancel(ref, force=True)
        reason = (
            f"{TIMEOUT_PREFIX}the trial ran longer than tune.trial_timeout_s="
            f"{self.tune.trial_timeout_s:g} s and was cancelled"
        )
        self._end_failed(running, reason)
        fail_trial(self.study, running.trial, "timeout", reason)

    def _end_failed(self, running: _Running, error: str) -> None:
        self.tracker.set_tags(running.run_id, {STATE_TAG: "FAIL"})
        self.tracker.end_run(running.run_id, "FAILED", error)

    def _abort(self) -> None:
        """Interrupted or failed driver: stop its tasks; their trials re-run on resume."""
        for ref, running in self.running.items():
            ray.cancel(ref, force=True)
            reason = "the search was interrupted"
            fail_or_requeue(self.study, running.trial, self.tune.max_lost_retries, reason)
            self.tracker.end_run(running.run_id, "KILLED", reason)
        self.running.clear()
