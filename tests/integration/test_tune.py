"""run_search on real Ray and a real MLflow server: the runs it logs, a trial that raises, resume
after a killed driver, concurrent trials (lost, stale and hanging trials: test_tune_failures.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from emotr.config import MlflowConfig
from emotr.hyperparams import HeadParams
from emotr.search.training_set import FeatureSet
from emotr.search.tune import run_search
from emotr.track import Tracker
from tests.conftest import REPO, smoke_config

pytestmark = pytest.mark.slow

PER_EPOCH = ("loss", "accuracy", "val_loss", "val_accuracy", "val_auc")
FINAL = ("val_precision", "val_recall", "val_f1", "val_log_loss", "best_epoch", "train_seconds")
PLOTS = {"plots/roc_curve.png", "plots/confusion_matrix.png", "plots/learning_curves.png"}
HEAD_PARAMS = tuple(HeadParams.model_fields)


def make_features(n: int = 300, seed: int = 0) -> FeatureSet:
    """Gaussian features whose class means differ along 16 of 512 dimensions (learnable)."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(np.int32)
    rng.shuffle(y)
    x = rng.normal(size=(n, 512)).astype(np.float32)
    x[:, :16] += np.where(y[:, None] == 1, 0.4, -0.4).astype(np.float32)
    cut = int(0.75 * n)
    return FeatureSet(x[:cut], y[:cut], x[cut:], y[cut:], "fingerprint-test", "split-test")


def server_tracker(uri: str) -> Tracker:
    name = f"tune-{uuid.uuid4().hex[:8]}"
    # mlflow-artifacts: sends artifacts through the server (its --artifacts-destination).
    return Tracker(
        MlflowConfig(
            tracking_uri=uri, experiment=name, artifact_location=f"mlflow-artifacts:/{name}"
        )
    )


def children(client: MlflowClient, tracker: Tracker, parent_id: str) -> dict[str, object]:
    runs = client.search_runs(
        [tracker.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=1000
    )
    return {run.info.run_name: run for run in runs}


def test_search_logs_every_trial_to_the_tracking_server(tmp_path: Path, ray_local, mlflow_server):
    cfg = smoke_config(
        tmp_path,
        "tune.n_trials=3",
        "tune.epochs=4",
        "tune.early_stopping_patience=4",
        # Every trial here keeps its best epoch (trial 0, the tutorial's, keeps its last:
        # test_trial_0_is_the_tutorials_recipe_trained_every_epoch).
        "tune.baseline.early_stopping=true",
    )
    tracker = server_tracker(mlflow_server)
    features = make_features()

    result = run_search(cfg, features, tracker, progress=False)

    assert (result.n_complete, result.n_failed) == (3, 0)
    assert result.best_value >= result.baseline_value
    client = MlflowClient(mlflow_server)
    trials = children(client, tracker, result.parent_run_id)
    assert set(trials) == {"trial-0", "trial-1", "trial-2"}
    for name, run in trials.items():
        run_id = run.info.run_id
        assert run.info.status == "FINISHED"
        assert run.data.tags["optuna.trial_number"] == name.removeprefix("trial-")
        assert set(HEAD_PARAMS) | {"feature_fingerprint", "split_digest", "trial_number"} <= set(
            run.data.params
        )
        n_epochs = len(client.get_metric_history(run_id, "loss"))
        assert 1 <= n_epochs <= cfg.tune.epochs
        for key in PER_EPOCH:
            steps = [point.step for point in client.get_metric_history(run_id, key)]
            # One point per trained epoch; val_* of the restored epoch again one step later.
            expected = list(range(1, n_epochs + 1)) + ([n_epochs + 1] if key == "val_auc" else [])
            assert sorted(steps)[: len(expected)] == expected
        auc = [p.value for p in client.get_metric_history(run_id, "val_auc") if p.step <= n_epochs]
        assert run.data.metrics["val_auc"] == pytest.approx(max(auc), abs=1e-6)
        assert set(FINAL) <= set(run.data.metrics)
        assert {item.path for item in client.list_artifacts(run_id, "plots")} >= PLOTS
    png = client.download_artifacts(result.best_run_id, "plots/roc_curve.png", str(tmp_path))
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model(f"runs:/{result.best_run_id}/model")
    assert model.metadata.signature is not None
    scores = np.asarray(model.predict(features.x_val[:4])).reshape(-1)
    assert scores.shape == (4,) and np.all((scores >= 0) & (scores <= 1))
    version = mlflow.register_model(f"runs:/{result.best_run_id}/model", tracker_name(tracker))
    assert version.version == "1"

    parent = client.get_run(result.parent_run_id)
    assert parent.info.run_name == "tune" and parent.info.status == "FINISHED"
    assert parent.data.metrics["best_val_auc"] == pytest.approx(result.best_value)
    assert parent.data.metrics["baseline_val_auc"] == pytest.approx(result.baseline_value)
    assert parent.data.tags["best_run_id"] == result.best_run_id
    table = client.download_artifacts(result.parent_run_id, "trials.csv", str(tmp_path))
    assert len(pd.read_csv(table)) == 3
    names = {item.path for item in client.list_artifacts(result.parent_run_id, "plots")}
    assert "plots/optimization_history.png" in names
    assert "config.yaml" in {item.path for item in client.list_artifacts(result.parent_run_id)}


def test_trial_0_is_the_tutorials_recipe_trained_every_epoch(tmp_path: Path, ray_local):
    epochs = 6  # tune.epochs, as the recipe's 100 but small; patience 1 would stop it early
    cfg = smoke_config(
        tmp_path, "tune.n_trials=2", f"tune.epochs={epochs}", "tune.early_stopping_patience=1"
    )
    tracker = Tracker(cfg.mlflow)

    result = run_search(cfg, make_features(), tracker, progress=False)

    assert result.n_complete == 2
    runs = {
        int(run.data.tags["optuna.trial_number"]): run
        for run in tracker.find_all_runs("tags.`emotr.role` = 'trial'")
    }
    zero, searched = runs[0].data.params, runs[1].data.params
    assert (zero["n_layers"], zero["units"], zero["activation"]) == ("1", "512", "relu")
    assert (zero["kernel_init"], zero["dropout"], zero["l2"]) == ("he_normal", "0.5", "0.0")
    assert (zero["learning_rate"], zero["batch_size"]) == ("0.0001", "32")
    assert (zero["early_stopping"], zero["standardize"], zero["class_weight"]) == ("False",) * 3
    assert (searched["early_stopping"], searched["kernel_init"]) == ("True", "glorot_uniform")
    run_id = runs[0].info.run_id
    for key in PER_EPOCH:  # every epoch's point, then the kept model's numbers one step later
        history = tracker.client.get_metric_history(run_id, key)
        assert sorted(p.step for p in history if p.step <= epochs) == list(range(1, epochs + 1))
    curve = sorted(tracker.client.get_metric_history(run_id, "val_auc"), key=lambda p: p.step)
    assert curve[-1].step == epochs + 1
    assert curve[-1].value == pytest.approx(curve[-2].value, abs=1e-6)  # the last epoch's model
    # The packed model is the notebook's head: Dense(512, relu, he_normal), Dropout(0.5).
    model = mlflow.keras.load_model(
        tracker.client.download_artifacts(run_id, "model", str(tmp_path))
    )
    hidden = model.get_layer("dense_0")
    assert hidden.units == 512 and type(hidden.kernel_initializer).__name__ == "HeNormal"
    assert model.get_layer("dropout_0").rate == 0.5


def tracker_name(tracker: Tracker) -> str:
    return tracker.client.get_experiment(tracker.experiment_id).name


def test_a_trial_that_raises_fails_alone(tmp_path: Path, ray_local, mlflow_server):
    space = "{activation: {type: categorical, choices: [relu, nonexistent_activation]}}"
    cfg = smoke_config(
        tmp_path,
        f"tune.search_space={space}",
        "tune.sampler=random",
        "tune.n_trials=4",
        "tune.epochs=2",
        "tune.min_complete_fraction=0",  # failures of its own code alone never fail a search
    )
    tracker = server_tracker(mlflow_server)

    result = run_search(cfg, make_features(), tracker, progress=False)

    study = optuna.load_study(study_name=cfg.tune.study_name, storage=cfg.tune.storage)
    states = {t.number: (t.state, t.params["activation"]) for t in study.trials}
    assert len(states) == 4
    assert {state for state, activation in states.values() if activation == "relu"} == {
        optuna.trial.TrialState.COMPLETE
    }
    failed = [n for n, (state, _) in states.items() if state == optuna.trial.TrialState.FAIL]
    assert failed and all(states[n][1] == "nonexistent_activation" for n in failed)
    assert result.n_failed == len(failed) and result.n_complete == 4 - len(failed)
    runs = children(MlflowClient(mlflow_server), tracker, result.parent_run_id)
    for number in failed:
        run = runs[f"trial-{number}"]
        assert run.info.status == "FAILED"
        assert "nonexistent_activation" in run.data.tags["error"]


DRIVER = """
import sys
import ray
from emotr.track import Tracker
from emotr.config_io import load_config
from emotr.search.tune import run_search
from tests.integration.test_tune import make_features

address, config_file, *overrides = sys.argv[1:]
ray.init(address=address, log_to_driver=False)
cfg = load_config([config_file], overrides)
run_search(cfg, make_features(), Tracker(cfg.mlflow), progress=False)
"""


def test_resume_after_the_driver_is_killed(tmp_path: Path, ray_local, mlflow_server):
    name = f"resume-{uuid.uuid4().hex[:6]}"
    overrides = [
        f"mlflow.tracking_uri={mlflow_server}",
        f"mlflow.experiment={name}",
        f"mlflow.artifact_location=mlflow-artifacts:/{name}",
        "tune.concurrency=1",
        "tune.epochs=40",
        "tune.early_stopping_patience=40",
        "tune.trial_heartbeat_s=1",  # the killed driver's lease goes stale 3 s after its death
    ]
    cfg = smoke_config(tmp_path, *overrides, "tune.n_trials=4")
    driver = subprocess.Popen(
        [
            sys.executable,
            "-c",
            DRIVER,
            ray_local.get_runtime_context().gcs_address,
            str(REPO / "conf" / "smoke.yaml"),
            *_path_overrides(tmp_path),
            *overrides,
            "tune.n_trials=4",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "driver.log", "wb"),  # noqa: SIM115 - closed with the process
    )
    before = _kill_after_one_complete(driver, cfg)
    # The newest RUNNING trial was just dispatched (the driver dispatches, then logs, then tells).
    killed = max(n for n, state in before.items() if state == optuna.trial.TrialState.RUNNING)

    result = run_search(cfg, make_features(), Tracker(cfg.mlflow), progress=False)

    study = optuna.load_study(study_name=cfg.tune.study_name, storage=cfg.tune.storage)
    trials = {t.number: t for t in study.trials}
    assert result.n_complete == 4
    for number, state in before.items():
        if state == optuna.trial.TrialState.COMPLETE:  # finished trials are not re-run
            assert trials[number].state == state
            assert not [t for t in trials.values() if t.user_attrs.get("retry_of") == number]
    assert trials[killed].state == optuna.trial.TrialState.FAIL
    retries = [t for t in trials.values() if t.user_attrs.get("retry_of") == killed]
    assert len(retries) == 1 and retries[0].state == optuna.trial.TrialState.COMPLETE
    assert retries[0].number > max(before), "trial numbers continue after a resume"
    assert retries[0].params == trials[killed].params
    tracker = Tracker(cfg.mlflow)
    runs = tracker.find_all_runs("tags.`emotr.role` = 'trial'")
    by_number: dict[int, list] = {}
    for run in runs:
        by_number.setdefault(int(run.data.tags["optuna.trial_number"]), []).append(run)
    assert all(len(found) == 1 for found in by_number.values()), "no duplicated trial runs"
    for number, trial in trials.items():
        if trial.state == optuna.trial.TrialState.COMPLETE:
            assert by_number[number][0].info.status == "FINISHED"
    stale = by_number[killed][0]
    assert stale.info.status == "FAILED" and "stale" in stale.data.tags["error"]
    parents = tracker.find_all_runs("tags.`emotr.role` = 'tune'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.metrics["n_complete"] == 4


def _path_overrides(tmp_path: Path) -> list[str]:
    cfg = smoke_config(tmp_path)
    return [
        f"tune.storage={cfg.tune.storage}",
        f"cache.root={cfg.cache.root}",
        f"data.root={cfg.data.root}",
    ]


def _kill_after_one_complete(driver: subprocess.Popen, cfg) -> dict[int, object]:
    """SIGKILL the driver once a trial is complete and another running; the states it left."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert driver.poll() is None, "the driver ended before it could be killed"
        try:
            study = optuna.load_study(study_name=cfg.tune.study_name, storage=cfg.tune.storage)
            states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
        except (KeyError, ValueError):  # the study does not exist yet
            states = {}
        values = set(states.values())
        if {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING} <= values:
            driver.send_signal(signal.SIGKILL)
            driver.wait(timeout=30)
            study = optuna.load_study(study_name=cfg.tune.study_name, storage=cfg.tune.storage)
            return {t.number: t.state for t in study.get_trials(deepcopy=False)}
        time.sleep(0.2)
    driver.kill()
    raise AssertionError("no trial completed within 180 s")


def test_four_concurrent_trials_on_the_local_store(tmp_path: Path, ray_local):
    cfg = smoke_config(
        tmp_path,
        "tune.n_trials=4",
        "tune.concurrency=4",
        "tune.cpus_per_trial=0.5",
        "tune.epochs=3",
        "tune.early_stopping_patience=3",
    )
    assert cfg.mlflow.tracking_uri.startswith("sqlite:///")
    tracker = Tracker(cfg.mlflow)

    result = run_search(cfg, make_features(), tracker, progress=False)

    assert (result.n_complete, result.n_failed) == (4, 0)
    runs = tracker.find_all_runs("tags.`emotr.role` = 'trial'")
    assert len(runs) == 4
    for run in runs:
        assert run.info.status == "FINISHED"
        for key in PER_EPOCH:
            # patience 3 cannot stop 3 epochs early: every run has exactly epochs 1, 2, 3.
            history = tracker.client.get_metric_history(run.info.run_id, key)
            assert sorted(p.step for p in history if p.step <= 3) == [1, 2, 3]
