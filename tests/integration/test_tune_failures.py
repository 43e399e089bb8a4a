"""run_search when trials go wrong, on real Ray: lost workers, a failed baseline, a trial of
another driver, a trial logged but not told, hanging trials."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import psutil
import pytest

from emotr.errors import EmotrError
from emotr.search.study import ROLE_TAG, STATE_TAG, STUDY_TAG, TRIAL_TAG, open_study
from emotr.search.tune import run_search
from emotr.track import Tracker
from tests.conftest import smoke_config
from tests.integration.test_tune import make_features

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def killing_the_first_trial_worker() -> Iterator[list[int]]:
    """SIGKILL the first trial worker that shows up; yields the killed trial's number."""
    killed: list[int] = []
    stop = threading.Event()

    def kill() -> None:
        # Only this test's Ray (a child of this process): other Ray sessions on the machine
        # have trial workers too.
        own = psutil.Process()
        while not stop.is_set() and not killed:
            for process in own.children(recursive=True):
                try:
                    title = (process.cmdline() or [""])[0]
                except psutil.Error:
                    continue
                if title.startswith("ray::trial-"):
                    killed.append(int(title.removeprefix("ray::trial-").split()[0]))
                    process.send_signal(signal.SIGKILL)
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    try:
        yield killed
    finally:
        stop.set()
        killer.join(timeout=5)
    assert killed, "no trial worker was found to kill"


LONG_TRIALS = ("tune.concurrency=1", "tune.epochs=60", "tune.early_stopping_patience=60")


def test_a_lost_worker_is_retried_once(tmp_path: Path, ray_local):
    cfg = smoke_config(tmp_path, "tune.n_trials=2", *LONG_TRIALS)
    tracker = Tracker(cfg.mlflow)

    with killing_the_first_trial_worker() as killed:
        result = run_search(cfg, make_features(), tracker, progress=False)

    study = optuna.load_study(study_name=cfg.tune.study_name, storage=cfg.tune.storage)
    trials = {t.number: t for t in study.trials}
    assert trials[killed[0]].state == optuna.trial.TrialState.FAIL
    retry = [t for t in trials.values() if t.user_attrs.get("retry_of") == killed[0]]
    assert len(retry) == 1 and retry[0].state == optuna.trial.TrialState.COMPLETE
    assert retry[0].params == trials[killed[0]].params
    assert (result.n_complete, result.n_lost, result.n_failed) == (2, 1, 0)
    lost = tracker.find_runs(f"tags.`optuna.trial_number` = '{killed[0]}'")[0]
    assert lost.info.status == "FAILED" and lost.data.tags["error"].startswith("lost: ")
    metrics = tracker.client.get_run(result.parent_run_id).data.metrics
    assert (metrics["n_complete"], metrics["n_lost"], metrics["n_trials_made"]) == (2, 1, 3)


def test_too_many_lost_trials_fail_the_search_naming_them(tmp_path: Path, ray_local):
    cfg = smoke_config(tmp_path, "tune.n_trials=2", "tune.max_lost_retries=0", *LONG_TRIALS)
    tracker = Tracker(cfg.mlflow)

    with killing_the_first_trial_worker() as killed, pytest.raises(EmotrError) as error:
        run_search(cfg, make_features(), tracker, progress=False)

    lost = tracker.find_runs(f"tags.`optuna.trial_number` = '{killed[0]}'")[0]
    message = str(error.value)
    assert "only 1 of tune.n_trials=2" in message and "min_complete_fraction=0.9" in message
    assert f"trial {killed[0]} (MLflow run {lost.info.run_id})" in message
    parent = tracker.find_runs("tags.`emotr.role` = 'tune'")[0]
    assert parent.info.status == "FAILED"
    counts = [parent.data.metrics[key] for key in ("n_complete", "n_failed", "n_lost")]
    assert counts == [1, 0, 1] and sum(counts) == parent.data.metrics["n_trials_made"]


def test_a_failed_baseline_is_reported_and_all_failed_is_one_clear_error(tmp_path: Path, ray_local):
    broken = ("tune.baseline.activation=nonexistent_activation", "tune.epochs=2")
    space = "tune.search_space={activation: {type: categorical, choices: [relu]}}"
    overrides = ("tune.n_trials=2", "tune.concurrency=1", "tune.min_complete_fraction=0")
    cfg = smoke_config(tmp_path, *broken, space, *overrides)
    tracker = Tracker(cfg.mlflow)

    result = run_search(cfg, make_features(), tracker, progress=True)

    assert result.n_complete == 1 and result.baseline_value is None
    baseline = result.baseline_failure
    assert baseline is not None and "nonexistent_activation" in baseline.error
    assert tracker.client.get_run(baseline.run_id).info.status == "FAILED"
    parent = tracker.client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and "baseline_val_auc" not in parent.data.metrics
    assert parent.data.tags["baseline"].startswith(
        f"failed: trial 0 (MLflow run {baseline.run_id})"
    )

    only_baseline = smoke_config(tmp_path, *broken, "tune.n_trials=1", "tune.study_name=other")
    with pytest.raises(EmotrError) as error:
        run_search(only_baseline, make_features(), tracker, progress=False)
    run_id = (
        optuna.load_study(study_name="other", storage=cfg.tune.storage)
        .trials[0]
        .user_attrs["mlflow_run_id"]
    )
    assert str(error.value).startswith("no trial of study 'other' completed (1 failed")
    assert f"trial 0 (MLflow run {run_id}): ValueError" in str(error.value)
    assert "nonexistent_activation" in str(error.value)


def test_a_live_trial_of_another_driver_is_not_marked_stale(tmp_path: Path, ray_local):
    cfg = smoke_config(tmp_path, "tune.n_trials=3", "tune.epochs=3", "tune.trial_heartbeat_s=2.0")
    tracker = Tracker(cfg.mlflow)
    other = open_study(cfg.tune)  # another driver: one trial it keeps alive, then tells
    trial = other.ask()
    tags = {STUDY_TAG: cfg.tune.study_name, TRIAL_TAG: str(trial.number), ROLE_TAG: "trial"}
    other_run = tracker.start_run(f"trial-{trial.number}", tags=tags)
    stop = threading.Event()

    def drive() -> None:
        # Renew the lease until this search's own two trials are done, then finish the trial.
        while not stop.is_set():
            trial.set_user_attr("heartbeat", time.time())
            done = other.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if len(done) >= 2:
                break
            time.sleep(0.2)
        tracker.log_metrics(other_run, {"val_auc": 0.5})
        tracker.set_tags(other_run, {STATE_TAG: "COMPLETE"})
        tracker.end_run(other_run)
        other.tell(trial.number, 0.5)

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    try:
        result = run_search(cfg, make_features(), tracker, progress=False)
    finally:
        stop.set()
        driver.join(timeout=30)

    settled = optuna.load_study(study_name=cfg.tune.study_name, storage=cfg.tune.storage)
    assert settled.trials[trial.number].state == optuna.trial.TrialState.COMPLETE
    assert settled.trials[trial.number].value == 0.5
    assert len(settled.trials) == 3 and result.n_complete == 3
    run = tracker.client.get_run(other_run)
    assert run.info.status == "FINISHED" and "error" not in run.data.tags


def test_a_trial_logged_but_not_told_is_settled_from_mlflow(tmp_path: Path, ray_local):
    # The driver died after logging trial 0 to MLflow and before telling Optuna.
    cfg = smoke_config(tmp_path, "tune.n_trials=1", "tune.trial_heartbeat_s=0.2")
    tracker = Tracker(cfg.mlflow)
    features = make_features()
    study = open_study(cfg.tune)
    trial = study.ask()
    tags = {
        STUDY_TAG: cfg.tune.study_name,
        TRIAL_TAG: "0",
        ROLE_TAG: "trial",
        STATE_TAG: "COMPLETE",
    }
    run_id = tracker.start_run("trial-0", tags=tags)
    tracker.log_metrics(run_id, {"val_auc": 0.75})
    tracker.end_run(run_id)

    result = run_search(cfg, features, tracker, progress=False)

    settled = optuna.load_study(study_name=cfg.tune.study_name, storage=cfg.tune.storage)
    assert [t.state for t in settled.trials][trial.number] == optuna.trial.TrialState.COMPLETE
    assert settled.trials[trial.number].value == pytest.approx(0.75)
    assert result.n_complete == 1 and result.best_run_id == run_id


def test_a_hanging_trial_is_cancelled_and_the_search_goes_on(tmp_path: Path, ray_local):
    # Trials that would train for hours: each is cancelled at tune.trial_timeout_s. Last in this
    # file: cancelling kills the workers, and the next test would wait for new ones.
    cfg = smoke_config(
        tmp_path,
        "tune.n_trials=3",
        "tune.concurrency=2",
        "tune.trial_timeout_s=3",
        "tune.epochs=1000000",
        "tune.early_stopping_patience=1000000",
    )
    tracker = Tracker(cfg.mlflow)

    with pytest.raises(EmotrError) as error:
        run_search(cfg, make_features(), tracker, progress=False)

    study = optuna.load_study(study_name=cfg.tune.study_name, storage=cfg.tune.storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL] * 3
    assert {t.user_attrs["failure"] for t in study.trials} == {"timeout"}
    runs = tracker.find_all_runs("tags.`emotr.role` = 'trial'")
    assert len(runs) == 3
    for run in runs:
        assert run.info.status == "FAILED"
        assert "longer than tune.trial_timeout_s=3 s" in run.data.tags["error"]
    message = str(error.value)
    assert message.startswith("no trial of study 'emotr' completed (3 failed, 0 lost")
    assert any(f"(MLflow run {run.info.run_id}): timeout" in message for run in runs)
