"""One trial on a Ray worker: fit a head on the shared features, render its plots, pack its model.

A worker makes no study or tracking calls: it hands its history, metrics, plots (PNG) and packed
MLflow model back to the driver, which logs them and tells Optuna. So the SQLite Optuna and MLflow
stores see one writer, and a local store behaves like a tracking server.

Pruning (tune.pruner=median) happens here, without a round trip per epoch: the job carries the val
AUC curves of the trials complete at dispatch, and the task asks Optuna's own MedianPruner, in an
in-memory study holding that snapshot, after every epoch. Trials finishing while a trial runs are
not in its snapshot.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
import ray

from emotr.hyperparams import HeadParams
from emotr.search import plots
from emotr.search.training_set import FeatureSet
from emotr.track import keras_model_bytes

# A task that died with its worker or node, as opposed to one whose code raised.
_LOST_ERRORS = (
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.NodeDiedError,
    ray.exceptions.LocalRayletDiedError,
    ray.exceptions.OutOfMemoryError,
    ray.exceptions.ObjectLostError,
)


@dataclass(frozen=True)
class TrialJob:
    """Everything a trial task needs besides the features."""

    params: HeadParams
    epochs: int
    patience: int
    seed: int
    classes: tuple[str, ...]
    # (value, val AUC by epoch) of the trials complete at dispatch; None = no pruning.
    prune_against: list[tuple[float, dict[int, float]]] | None
    # MedianPruner compares only after this many complete trials and epochs.
    pruner_startup_trials: int
    pruner_warmup_epochs: int
    # > 1: the value is the mean AUC of this many folds over train + val and the head is refitted
    # on all of them (emotr.search.folds); 0 or 1: one validation split, as before.
    cv_folds: int = 0


def submit_trial(
    features_ref: ray.ObjectRef, job: TrialJob, number: int, cpus: float, gpus: float = 0.0
) -> ray.ObjectRef:
    """Start trial `number` as the Ray task `trial-<number>` on `cpus` CPUs and `gpus` GPUs;
    it returns a TrialOutcome."""
    task = _train_trial_task.options(
        num_cpus=cpus, num_gpus=gpus, runtime_env=_worker_env(cpus), name=f"trial-{number}"
    )
    return task.remote(features_ref, job)


def task_failure(error: ray.exceptions.RayError) -> tuple[bool, str]:
    """(lost, text) of a failed trial task: lost when its worker or node died, not its code."""
    cause = error.cause if isinstance(error, ray.exceptions.RayTaskError) else error
    lost = isinstance(error, _LOST_ERRORS) or isinstance(cause, _LOST_ERRORS)
    return lost, f"{type(cause).__name__}: {cause}".strip()


def _worker_env(cpus: float) -> dict[str, Any]:
    threads = str(max(1, int(cpus)))
    # TensorFlow reads these when it starts in a worker; Ray reuses workers only among tasks
    # with the same runtime_env, so every trial worker keeps the pool size it started with.
    return {
        "env_vars": {
            "TF_NUM_INTRAOP_THREADS": threads,
            "TF_NUM_INTEROP_THREADS": threads,
            "OMP_NUM_THREADS": threads,
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
    }


@dataclass(frozen=True)
class TrialOutcome:
    """What a trial task hands back to the driver, which logs it and tells Optuna."""

    history: dict[str, list[float]]  # per-epoch curves, by Keras name (the first fold's)
    metrics: dict[str, float]  # the restored epoch's validation numbers and train_seconds
    pruned: bool
    plots: dict[str, bytes]  # PNG by artifact path
    model: bytes | None  # packed MLflow model (registry.keras_model_bytes); None when pruned
    started: float  # time.time() in the worker
    finished: float
    cpu_seconds: float
    # Cross-validated trials: (n, K) out-of-fold probabilities of train + val rows (in
    # FeatureSet.pooled order) and each row's fold; what ensemble selection averages.
    oof_proba: np.ndarray | None = None
    folds: np.ndarray | None = None

    @property
    def n_epochs(self) -> int:
        """Epochs trained."""
        return len(self.history["val_auc"])

    @property
    def val_auc(self) -> float:
        """The trial's value: val AUC (macro one vs rest for K > 2) of the restored epoch."""
        return self.metrics["val_auc"]


def train_trial(features: FeatureSet, job: TrialJob) -> TrialOutcome:
    """Fit one head (cross-validated and refitted with job.cv_folds > 1), render its plots, pack
    its MLflow model."""
    started, cpu_started = time.time(), time.process_time()
    result, crossed = _fit(features, job)
    curves = crossed.first_fold if crossed is not None else result
    pngs = {
        "plots/roc_curve.png": plots.roc_figure(result.roc, job.classes, result.metrics["val_auc"]),
        "plots/confusion_matrix.png": plots.confusion_figure(result.confusion, job.classes),
        "plots/learning_curves.png": plots.learning_curves_figure(
            curves.history, _restored_epoch(job.params, curves.metrics)
        ),
    }
    # A pruned head is never deployed: skip saving it.
    # A fine-tuned model takes activations (FineTuneSet.a_val), a head features.
    if job.params.finetune:
        example = features.a_val[:5]
    else:
        example = features.select(job.params.features).x_val[:5]
    example = np.asarray(example, dtype=np.float32)
    model = None if result.stopped_by_callback else keras_model_bytes(result.model, example)
    return TrialOutcome(
        history=result.history,
        metrics={**result.metrics, "train_seconds": result.train_seconds, "gpus": _gpus_held()},
        pruned=result.stopped_by_callback,
        plots={name: plots.to_png(figure) for name, figure in pngs.items()},
        model=model,
        started=started,
        finished=time.time(),
        cpu_seconds=time.process_time() - cpu_started,
        oof_proba=None if crossed is None else crossed.oof_proba,
        folds=None if crossed is None else crossed.folds,
    )


def _gpus_held() -> float:
    """GPUs (or the share of one) Ray gave this trial's task; 0 outside a task (a driver, a
    test calling train_trial itself)."""
    if not ray.is_initialized():
        return 0.0
    context = ray.get_runtime_context()
    if context.worker.mode != ray.WORKER_MODE:
        return 0.0
    return float(context.get_assigned_resources().get("GPU", 0.0))


def _fit(features: FeatureSet, job: TrialJob) -> tuple[Any, Any]:
    """(HeadResult, CrossValidated or None): fine-tuning, cross-validation, or one split."""
    # Imported on the worker: the driver, which imports this module, never loads TensorFlow.
    from emotr.search.folds import CrossValidated, assign_folds, cross_validate, fit_any

    fit_args = {
        "epochs": job.epochs,
        "patience": job.patience,
        "seed": job.seed,
        "on_epoch_end": _pruning_check(job),
        "classes": job.classes,
    }
    if job.params.finetune:
        from emotr.search.finetune import fit_finetune

        return fit_finetune(job.params, features, **fit_args), None
    features = features.select(job.params.features)  # the taps this trial's head reads
    if job.cv_folds <= 1:
        split = (features.x_train, features.y_train, features.x_val, features.y_val)
        if job.params.train_views:
            fit_args["x_views"] = features.x_views_train
        return fit_any(job.params, *split, **fit_args), None
    x, y, units = features.pooled()
    folds = assign_folds(y, units, job.cv_folds, job.seed)
    views = features.pooled_views() if job.params.train_views else None
    result = cross_validate(job.params, x, y, folds, fit_any, views=views, **fit_args)
    if isinstance(result, CrossValidated):
        return result.refit, result
    return result, None  # pruned in its first fold


def _restored_epoch(params: HeadParams, metrics: dict[str, float]) -> int | None:
    """The epoch whose weights early stopping restored; None without early stopping (the last
    epoch's weights are kept: there is nothing to mark)."""
    return int(metrics["best_epoch"]) if params.early_stopping else None


def _pruning_check(job: TrialJob) -> Any:
    """An on_epoch_end asking MedianPruner about the job's snapshot; None = no pruning."""
    if job.prune_against is None:
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # this worker's copy, not the driver's
    snapshot = optuna.create_study(
        direction="maximize",
        pruner=optuna.pruners.MedianPruner(
            n_startup_trials=job.pruner_startup_trials, n_warmup_steps=job.pruner_warmup_epochs
        ),
    )
    snapshot.add_trials(
        [
            optuna.trial.create_trial(value=value, intermediate_values=steps)
            for value, steps in job.prune_against
        ]
    )
    trial = snapshot.ask()

    def check(epoch: int, logs: dict) -> bool:
        trial.report(logs["val_auc"], epoch)
        return trial.should_prune()

    return check


_train_trial_task = ray.remote(max_retries=0)(train_trial)  # lost tasks are re-enqueued instead
