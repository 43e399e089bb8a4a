"""What a search reports: the live status line and the summary on its `tune` run.

The best trials as the console shows them: emotr.search.top_trials.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from emotr.config import Config, TuneConfig
from emotr.config_io import to_yaml
from emotr.search.study import (
    ERROR_ATTR,
    FAILURE_ATTR,
    FIXED_ATTR,
    LEASE_ATTR,
    PEER_ATTR,
    count_trials,
    find_study_runs,
    n_counted,
)
from emotr.track import Tracker

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

# The numbers of the restored epoch, logged per trial and, prefixed best_, on the `tune` run.
FINAL_METRICS = ("val_auc", "val_accuracy", "val_balanced_accuracy", "val_precision")
FINAL_METRICS += ("val_recall", "val_f1", "val_log_loss", "best_epoch", "train_seconds")
FINAL_METRICS += ("val_auc_std", "val_auc_oof", "n_folds")
# Driver bookkeeping in the trials' user attributes; the full head params get their own columns.
_HIDDEN_ATTRS = ("enqueued_params", "head_params", "val_auc_curve", LEASE_ATTR, FIXED_ATTR)


def objective_name(n_classes: int) -> str:
    """What the report and plots call the objective (the metric `val_auc` for every K)."""
    if n_classes == 2:
        return "val AUC"
    return f"val macro AUC (one vs rest, {n_classes} classes)"


@dataclass(frozen=True)
class FailedTrial:
    """A trial that failed: why (raised, timeout, lost), its MLflow run and its error text."""

    number: int
    failure: str
    run_id: str | None
    error: str

    def describe(self) -> str:
        """One line: `trial 3 (run abc...): ValueError: ...`."""
        error = " ".join(self.error.split())[:200]
        return f"trial {self.number} (MLflow run {self.run_id}): {error}"


@dataclass(frozen=True)
class FixedTrial:
    """A fixed trial of every search (the plain peer): its number, run and value, or why not."""

    number: int
    run_id: str | None
    value: float | None  # None when it did not complete
    value_std: float | None = None
    failure: str | None = None

    def text(self) -> str:
        """Its value with the fold spread, or what happened to it."""
        if self.value is None:
            return self.failure or "did not complete"
        spread = f" +- {self.value_std:.4f}" if self.value_std is not None else ""
        return f"{self.value:.4f}{spread} (trial {self.number})"


@dataclass
class SearchResult:
    """What a search produced; `trials` has one row per trial of the study (all runs of it)."""

    study_name: str
    best_trial_number: int | None
    best_value: float | None
    best_params: dict[str, Any] | None
    best_run_id: str | None
    baseline_value: float | None  # None when the baseline trial did not complete
    baseline_failure: FailedTrial | None  # the baseline trial, when it failed
    n_complete: int
    n_failed: int
    n_pruned: int
    n_lost: int
    failed_trials: list[FailedTrial]
    trials: pd.DataFrame
    parent_run_id: str
    wall_seconds: float
    peer: FixedTrial | None = None  # the plain peer (tune.peer), when it ran
    # The best trial's spread of fold AUCs (cross-validated searches), else None.
    best_value_std: float | None = None
    # Out-of-fold (probabilities, folds) by trial number, of the trials this driver ran.
    oof: dict[int, tuple[Any, Any]] = field(default_factory=dict)

    def complete_run_of(self, mark: str) -> str | None:
        """The MLflow run of the complete trial marked `mark` (baseline, peer), or None."""
        column = f"user_attrs_{mark}"
        if column not in self.trials:
            return None
        rows = self.trials[self.trials[column].eq(True) & self.trials["state"].eq("COMPLETE")]
        return str(rows["run_id"].iloc[0]) if len(rows) and rows["run_id"].iloc[0] else None

    def baseline_text(self) -> str:
        """The baseline's val AUC, or that it failed and where to look."""
        if self.baseline_value is not None:
            return f"{self.baseline_value:.4f}"
        if self.baseline_failure is not None:
            return f"failed: {self.baseline_failure.describe()}"
        return "not run"


def status_line(study: optuna.Study, n_trials: int) -> str:
    """One line of progress for the live display; its counts add up to the trials made."""
    trials = study.get_trials(deepcopy=False)
    counts, best = count_trials(trials), _best(trials)
    best_text = f"best val AUC {best.value:.4f} (trial {best.number})" if best else "no result yet"
    waiting = f", {counts.n_waiting} waiting" if counts.n_waiting else ""
    return (
        f"[bold]tune {study.study_name}[/]: {n_counted(trials)}/{n_trials} done; "
        f"{counts.n_made} trials: {counts.n_complete} complete, {counts.n_pruned} pruned, "
        f"{counts.n_failed} failed, {counts.n_lost} lost, {counts.n_running} running{waiting}"
        f" - {best_text}"
    )


def _best(trials: list[FrozenTrial]) -> FrozenTrial | None:
    complete = [trial for trial in trials if trial.state == TrialState.COMPLETE]
    return max(complete, key=lambda trial: trial.value, default=None)


def _failed(trials: list[FrozenTrial]) -> list[FailedTrial]:
    return [
        FailedTrial(
            number=trial.number,
            failure=trial.user_attrs.get(FAILURE_ATTR, "raised"),
            run_id=trial.user_attrs.get("mlflow_run_id"),
            error=str(trial.user_attrs.get(ERROR_ATTR, "")),
        )
        for trial in trials
        if trial.state == TrialState.FAIL
    ]


def _baseline(trials: list[FrozenTrial]) -> tuple[float | None, FailedTrial | None]:
    """The baseline's value, or its last failure when no baseline trial completed."""
    baseline = [trial for trial in trials if trial.user_attrs.get("baseline")]
    complete = [trial for trial in baseline if trial.state == TrialState.COMPLETE]
    if complete:
        return complete[0].value, None
    failed = _failed(baseline)
    return None, (failed[-1] if failed else None)


def _peer(trials: list[FrozenTrial], runs: dict[int, Any], tracker: Tracker) -> FixedTrial | None:
    """The peer trial (its completed run, else its last attempt), or None without one."""
    peers = [trial for trial in trials if trial.user_attrs.get(PEER_ATTR)]
    if not peers:
        return None
    complete = [trial for trial in peers if trial.state == TrialState.COMPLETE]
    trial = complete[0] if complete else peers[-1]
    run = runs.get(trial.number)
    run_id = run.info.run_id if run is not None else None
    if not complete:
        failed = _failed([trial])
        failure = f"failed: {failed[0].describe()}" if failed else trial.state.name.lower()
        return FixedTrial(trial.number, run_id, None, failure=failure)
    std = tracker.client.get_run(run_id).data.metrics.get("val_auc_std") if run_id else None
    return FixedTrial(trial.number, run_id, trial.value, std)


def summarize_search(
    cfg: Config,
    study: optuna.Study,
    tracker: Tracker,
    parent_id: str,
    timings: dict[int, dict[str, float]],
    started: float,
) -> SearchResult:
    """Log the study's summary to its `tune` run (the caller ends it) and build the SearchResult.

    Args:
        timings: seconds per stage of the trials this driver ran, by trial number.
        started: time.perf_counter() when the search started.
    """
    trials = study.get_trials(deepcopy=False)
    counts, best = count_trials(trials), _best(trials)
    baseline_value, baseline_failure = _baseline(trials)
    _, runs = find_study_runs(tracker, study.study_name)  # another driver's trials included
    best_run_id = runs[best.number].info.run_id if best and best.number in runs else None
    summary = {**counts.as_metrics(), "n_trials_made": float(counts.n_made)}
    objective = objective_name(len(cfg.data.classes))
    tracker.set_tags(parent_id, {"objective": f"val_auc: {objective}"})
    if best_run_id is not None:
        best_metrics = tracker.client.get_run(best_run_id).data.metrics
        summary.update(
            {f"best_{key}": best_metrics[key] for key in FINAL_METRICS if key in best_metrics}
        )
        tracker.set_tags(parent_id, {"best_run_id": best_run_id, "best_trial_number": best.number})
    peer = _peer(trials, runs, tracker)
    if peer is not None and peer.value is not None:
        summary["peer_val_auc"] = peer.value
    if baseline_value is not None:
        summary["baseline_val_auc"] = baseline_value
    elif baseline_failure is not None:
        log.warning("the baseline trial failed: %s", baseline_failure.describe())
        tracker.set_tags(parent_id, {"baseline": f"failed: {baseline_failure.describe()}"})
    tracker.log_metrics(parent_id, summary)
    frame = _trials_frame(study, runs, timings)
    tracker.log_table(parent_id, frame, "trials.csv")
    tracker.log_text(parent_id, to_yaml(cfg), "config.yaml")
    _log_optuna_plots(tracker, parent_id, study, counts.n_complete, objective)
    return SearchResult(
        study_name=study.study_name,
        best_trial_number=best.number if best else None,
        best_value=best.value if best else None,
        best_params=best.user_attrs.get("head_params") if best else None,
        best_run_id=best_run_id,
        baseline_value=baseline_value,
        baseline_failure=baseline_failure,
        n_complete=counts.n_complete,
        n_failed=counts.n_failed,
        n_pruned=counts.n_pruned,
        n_lost=counts.n_lost,
        failed_trials=_failed(trials),
        trials=frame,
        parent_run_id=parent_id,
        wall_seconds=time.perf_counter() - started,
        peer=peer,
        best_value_std=summary.get("best_val_auc_std"),
    )


def search_failure(result: SearchResult, tune: TuneConfig) -> str | None:
    """Why a finished search is not a usable result (one line), or None when it is."""
    name, failed = result.study_name, result.failed_trials
    raised = [trial for trial in failed if trial.failure != "lost"]
    lost = [trial for trial in failed if trial.failure == "lost"]
    if result.best_run_id is None:
        first = (raised or lost)[:1]
        detail = f"; first failure: {first[0].describe()}" if first else ""
        return (
            f"no trial of study {name!r} completed ({result.n_failed} failed, {result.n_lost} "
            f"lost, {result.n_pruned} pruned){detail}"
        )
    n_done = result.n_complete + result.n_pruned
    if n_done >= tune.min_complete_fraction * tune.n_trials:
        return None
    named = ", ".join(f"trial {trial.number} (MLflow run {trial.run_id})" for trial in lost[:10])
    named += f" and {len(lost) - 10} more in trials.csv" if len(lost) > 10 else ""
    text = (
        f"only {n_done} of tune.n_trials={tune.n_trials} trials of study {name!r} completed, "
        f"fewer than tune.min_complete_fraction={tune.min_complete_fraction:g}: "
        f"{len(lost)} lost to dead workers" + (f" ({named})" if named else "")
    )
    if raised:
        text += f", {len(raised)} failed (first: {raised[0].describe()})"
    return text + "; resume with the same tune.study_name to run the missing trials"


def _trials_frame(
    study: optuna.Study, runs: dict[int, Any], timings: dict[int, dict[str, float]]
) -> pd.DataFrame:
    """One row per trial: Optuna's columns, the full head params, the MLflow run id, timings."""
    frame = study.trials_dataframe(attrs=("number", "value", "state", "duration", "user_attrs"))
    head = pd.DataFrame(
        [trial.user_attrs.get("head_params", {}) for trial in study.get_trials(deepcopy=False)]
    )
    frame = pd.concat([frame, head.add_prefix("param_")], axis=1)
    hidden = {f"user_attrs_{name}" for name in _HIDDEN_ATTRS}
    frame = frame.drop(columns=[name for name in frame.columns if name in hidden])
    frame["run_id"] = [runs[n].info.run_id if n in runs else None for n in frame["number"]]
    timing = pd.DataFrame.from_dict(timings, orient="index")
    return frame.join(timing, on="number") if not timing.empty else frame


def _log_optuna_plots(
    tracker: Tracker, run_id: str, study: optuna.Study, n_complete: int, objective: str
) -> None:
    if n_complete == 0:
        return
    tracker.log_figure(run_id, history_figure(study, objective), "plots/optimization_history.png")
    if n_complete < 2:
        tracker.set_tags(run_id, {"plots.param_importances": "skipped: < 2 complete trials"})
        return
    try:
        figure = importance_figure(study, objective)
    except (ValueError, RuntimeError) as error:  # e.g. every trial has the same params
        tracker.set_tags(run_id, {"plots.param_importances": f"skipped: {error}"})
        return
    tracker.log_figure(run_id, figure, "plots/param_importances.png")


def history_figure(study: optuna.Study, objective: str = "val AUC") -> Figure:
    """Optuna's optimization history, its objective named `objective`."""
    # Optuna's matplotlib plots import matplotlib's pyplot (seconds): only a finished search pays.
    from optuna.visualization import matplotlib as optuna_plots

    with _quiet():
        axes = optuna_plots.plot_optimization_history(study, target_name=objective)
    return _fit_labels(axes.figure)


def importance_figure(study: optuna.Study, objective: str = "val AUC") -> Figure:
    """Optuna's hyperparameter importances, sized so that every parameter name shows whole."""
    from optuna.visualization import matplotlib as optuna_plots

    with _quiet():
        axes = optuna_plots.plot_param_importances(study, target_name=objective)
    n_params = len(axes.get_yticks())
    axes.figure.set_size_inches(8, max(3.0, 0.4 * n_params + 1.5))
    # Room right of the longest bar for Optuna's value labels.
    axes.set_xlim(0, max(1e-9, axes.get_xlim()[1]) * 1.15)
    return _fit_labels(axes.figure)


def _fit_labels(figure: Figure) -> Figure:
    # Optuna's default 6.4 x 4.8 in figure with fixed margins cuts long tick labels.
    figure.tight_layout()
    return figure


@contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        # Optuna warns about few trials per regime: expected early on, and not actionable.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield
