"""Four classes end to end: `emotr run` on class folders, the K-column model, predict, serve and
the promotion gate on macro AUC over the test split the search never read."""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import yaml
from mlflow.tracking import MlflowClient

from emotr import pipeline
from emotr.deploy.package import register_model
from emotr.deploy.promote import point_champion, promote_challenger
from emotr.deploy.registry import fluent_store, load_evaluation_set, load_validation_set
from emotr.search.training_set import load_feature_set
from emotr.track import Tracker
from tests.conftest import (
    FOUR_CLASSES,
    shuffled_label_candidate,
    smoke_config,
    write_class_folders,
)
from tests.run_cli import emotr
from tests.services import BIN, free_port, serving

pytestmark = pytest.mark.slow

MODEL = "emotr-four"
COLUMNS = [f"p_{name}" for name in FOUR_CLASSES]


@pytest.fixture(scope="module")
def four(tmp_path_factory, ray_local, mlflow_server):
    """A smoke `emotr run` on four class folders (data.classes null), on the session's server."""
    root = tmp_path_factory.mktemp("four")
    write_class_folders(root / "data")
    cfg = smoke_config(
        root,
        "data.generate_demo=false",
        "data.classes=null",
        "data.test_fraction=0.2",
        f"mlflow.tracking_uri={mlflow_server}",
        "mlflow.experiment=four",
        f"registry.model_name={MODEL}",
        "tune.epochs=30",
        "tune.early_stopping_patience=10",
    )
    tracker = Tracker(cfg.mlflow)
    result = pipeline.run(cfg, tracker, pipeline.prepare_scan(cfg))
    resolved = pipeline.resolve_data(cfg)
    config_file = root / "four.yaml"
    config_file.write_text(yaml.safe_dump(resolved.model_dump(mode="json")))
    return resolved, tracker, result, config_file


def test_four_class_folders_run_end_to_end(four):
    cfg, tracker, result, _ = four
    assert cfg.data.classes == FOUR_CLASSES  # inferred: sorted folder names
    client = MlflowClient(tracker.uri)
    version = client.get_model_version(MODEL, result.model_version)
    assert json.loads(version.tags["classes"]) == list(FOUR_CLASSES)
    # The test numbers: on the pipeline run and as tags of the version.
    metrics = client.get_run(result.pipeline_run_id).data.metrics
    assert 0.0 <= metrics["test_auc_low"] <= metrics["test_auc"] <= metrics["test_auc_high"] <= 1
    assert {"test_accuracy", "test_balanced_accuracy", "test_auc_happy"} <= set(metrics)
    assert float(version.tags["test_auc"]) == pytest.approx(metrics["test_auc"], abs=1e-6)
    assert result.test.startswith("test AUC")
    # Per-class numbers and plots in the trial runs.
    trial = client.get_run(version.run_id)
    assert {f"val_auc_{name}" for name in FOUR_CLASSES} <= set(trial.data.metrics)
    plots = {item.path for item in client.list_artifacts(version.run_id, "plots")}
    assert {"plots/roc_curve.png", "plots/confusion_matrix.png"} <= plots
    assert trial.data.metrics["val_auc"] > 0.8  # the tints are learnable


def test_no_test_image_reaches_a_trial(four):
    cfg, tracker, result, _ = four
    listing = pipeline.prepare_listing(cfg)
    version = MlflowClient(tracker.uri).get_model_version(MODEL, result.model_version)
    features = load_feature_set(
        cfg.cache.root, cfg.tune, listing, version.tags["feature_fingerprint"]
    )
    test = set(listing.test()["sha256"])
    assert test and not test & (set(features.sha256_train) | set(features.sha256_val))
    assert set(load_evaluation_set(tracker, version)[0]["sha256"]) == test


def test_version_probabilities_equal_the_trials_and_sum_to_one(four):
    cfg, tracker, result, _ = four
    version = MlflowClient(tracker.uri).get_model_version(MODEL, result.model_version)
    validation = load_validation_set(tracker, version)
    with fluent_store(tracker):
        served = mlflow.pyfunc.load_model(f"models:/{MODEL}/{version.version}").predict(
            pd.DataFrame({"path": validation["path"]})
        )
    assert list(served.columns) == [*COLUMNS, "label", "error"]
    probabilities = served[COLUMNS].to_numpy(dtype=float)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    listing = pipeline.prepare_listing(cfg)
    features = load_feature_set(
        cfg.cache.root, cfg.tune, listing, version.tags["feature_fingerprint"]
    )
    with fluent_store(tracker):
        head = mlflow.keras.load_model(f"runs:/{version.run_id}/model")
    rows = pd.Series(range(len(features.sha256_val)), index=list(features.sha256_val))
    x_val = features.x_val[rows.loc[validation["sha256"]].to_numpy()]
    np.testing.assert_allclose(probabilities, np.asarray(head(x_val, training=False)), atol=1e-4)
    assert set(served["label"]) <= set(FOUR_CLASSES)


def test_predict_writes_one_column_per_class(four, tmp_path: Path):
    cfg, _, _, config_file = four
    output = tmp_path / "predictions.csv"
    data = Path(cfg.data.root)
    done = emotr("predict", str(data / "happy"), str(data / "sad"), "-c", str(config_file),
                 "--model", f"models:/{MODEL}@champion", "--output", str(output))  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = pd.read_csv(output)
    assert list(rows.columns) == ["path", *COLUMNS, "label", "error"]
    assert len(rows) == 60
    np.testing.assert_allclose(rows[COLUMNS].sum(axis=1), 1.0, atol=1e-5)
    assert (rows["label"] == rows["path"].map(lambda p: Path(p).parent.name)).mean() > 0.8


def test_mlflow_models_serve_answers_one_column_per_class(four, tmp_path: Path):
    cfg, tracker, _, _ = four
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}@champion"]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracker.uri, "PATH": path}
    with serving(command, f"http://127.0.0.1:{port}/ping", tmp_path / "serve.log", 240, env):
        image = (Path(cfg.data.root) / "sad" / "img_000.png").read_bytes()
        body = {
            "dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(image).decode()]]}
        }
        response = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=60)
    assert response.status_code == 200, response.text
    (row,) = response.json()["predictions"]
    assert sum(row[name] for name in COLUMNS) == pytest.approx(1.0, abs=1e-5)
    assert row["label"] in FOUR_CLASSES and not row.get("error")


def test_gate_moves_the_champion_on_macro_auc_and_refuses_shuffled_labels(four):
    cfg, tracker, result, config_file = four
    client = MlflowClient(tracker.uri)
    good = client.get_model_version(MODEL, result.model_version)
    shuffled = register_model(cfg, tracker, shuffled_label_candidate(cfg, tracker, good))
    # A challenger trained on shuffled labels does not replace the good champion ...
    refused = promote_challenger(cfg, tracker)
    assert not refused.decision.promote and "macro AUC" in refused.decision.reason
    assert refused.split == "test"
    assert refused.comparison.n_images == len(load_evaluation_set(tracker, good)[0])
    # --data: the whole folder set, labelled by the challenger's classes (p_<class> order).
    done = emotr("promote", "-c", str(config_file), "--data", cfg.data.root)
    assert done.returncode == 0, done.stderr
    assert "not promoted" in done.stdout and "macro AUC" in done.stdout
    tags = client.get_model_version(MODEL, shuffled.version).tags
    assert tags["promotion.split"] == "given" and tags["promotion.n_images"] == "120"
    # ... and the good one, challenging the shuffled champion, takes its place.
    point_champion(cfg, tracker, str(shuffled.version))
    client.set_registered_model_alias(MODEL, cfg.registry.challenger_alias, good.version)
    moved = promote_challenger(cfg, tracker)
    assert moved.decision.promote, moved.decision.reason
    assert moved.comparison.low > 0
    assert client.get_model_version_by_alias(MODEL, "champion").version == good.version
