"""What a search reports: the live status line, the summary on its `tune` run, the top trials."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState
from rich.table import Table

from emotr.config import Config, to_yaml
from emotr.study import n_counted
from emotr.track import Tracker

# The numbers of the restored epoch, logged per trial and, prefixed best_, on the `tune` run.
FINAL_METRICS = ("val_auc", "val_accuracy", "val_precision", "val_recall", "val_f1")
FINAL_METRICS += ("val_log_loss", "best_epoch", "train_seconds")
# Driver bookkeeping in the trials' user attributes; the full head params get their own columns.
_HIDDEN_ATTRS = ("enqueued_params", "head_params", "val_auc_curve")


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


def status_line(study: optuna.Study, n_trials: int, n_running: int) -> str:
    """One line of progress for the live display."""
    trials = study.get_trials(deepcopy=False)
    counts, best = _counts(trials), _best(trials)
    best_text = f"best val AUC {best.value:.4f} (trial {best.number})" if best else "no result yet"
    return (
        f"[bold]tune {study.study_name}[/]: {n_counted(trials)}/{n_trials} done, "
        f"{counts['n_failed']} failed, {counts['n_pruned']} pruned, "
        f"{n_running} running - {best_text}"
    )


def _counts(trials: list[FrozenTrial]) -> dict[str, int]:
    states = [trial.state for trial in trials]
    return {
        "n_complete": states.count(TrialState.COMPLETE),
        "n_failed": states.count(TrialState.FAIL),
        "n_pruned": states.count(TrialState.PRUNED),
    }


def _best(trials: list[FrozenTrial]) -> FrozenTrial | None:
    complete = [trial for trial in trials if trial.state == TrialState.COMPLETE]
    return max(complete, key=lambda trial: trial.value, default=None)


def summarize_search(
    cfg: Config,
    study: optuna.Study,
    tracker: Tracker,
    parent_id: str,
    runs: dict[int, Any],
    timings: dict[int, dict[str, float]],
    started: float,
) -> SearchResult:
    """Log the study's summary to its `tune` run, end that run and build the SearchResult.

    Args:
        runs: the trial runs by trial number.
        timings: seconds per stage of the trials this driver ran, by trial number.
        started: time.perf_counter() when the search started.
    """
    trials = study.get_trials(deepcopy=False)
    counts, best = _counts(trials), _best(trials)
    baseline = [
        t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs.get("baseline")
    ]
    baseline_value = baseline[0].value if baseline else None
    best_run_id = runs[best.number].info.run_id if best else None
    summary: dict[str, float] = {key: float(value) for key, value in counts.items()}
    if best_run_id is not None:
        best_metrics = tracker.client.get_run(best_run_id).data.metrics
        summary.update(
            {f"best_{key}": best_metrics[key] for key in FINAL_METRICS if key in best_metrics}
        )
        tracker.set_tags(parent_id, {"best_run_id": best_run_id, "best_trial_number": best.number})
    if baseline_value is not None:
        summary["baseline_val_auc"] = baseline_value
    tracker.log_metrics(parent_id, summary)
    frame = _trials_frame(study, runs, timings)
    tracker.log_table(parent_id, frame, "trials.csv")
    tracker.log_text(parent_id, to_yaml(cfg), "config.yaml")
    _log_optuna_plots(tracker, parent_id, study, counts["n_complete"])
    tracker.end_run(parent_id)
    return SearchResult(
        study_name=study.study_name,
        best_trial_number=best.number if best else None,
        best_value=best.value if best else None,
        best_params=best.user_attrs.get("head_params") if best else None,
        best_run_id=best_run_id,
        baseline_value=baseline_value,
        trials=frame,
        parent_run_id=parent_id,
        wall_seconds=time.perf_counter() - started,
        **counts,
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
    hidden = {f"user_attrs_{name}" for name in _HIDDEN_ATTRS}
    frame = frame.drop(columns=[name for name in frame.columns if name in hidden])
    frame["run_id"] = [runs[n].info.run_id if n in runs else None for n in frame["number"]]
    timing = pd.DataFrame.from_dict(timings, orient="index")
    return frame.join(timing, on="number") if not timing.empty else frame


def _log_optuna_plots(tracker: Tracker, run_id: str, study: optuna.Study, n_complete: int) -> None:
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


def top_table(result: SearchResult, n: int = 5) -> Table:
    """The n best complete trials of the study with their head params."""
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
