"""The whole job on a tiny demo set: extract -> tune -> register -> gate -> the deployable model."""

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from emotr import pipeline
from emotr.deploy.predict import load_predictor, predict_chunks
from emotr.deploy.registry import RegistryError, load_validation_set
from emotr.search.training_set import load_feature_set
from emotr.track import Tracker
from tests.conftest import smoke_config

pytestmark = pytest.mark.slow

METADATA = ("classes", "input_size", "weights_sha256", "feature_fingerprint", "split_digest")
METADATA += ("study", "trial", "emotr_version", "git_commit", "validation_set")


def test_run_registers_a_deployable_champion(tmp_path: Path, ray_local, fluent_uri, capfd):
    mlflow_server = fluent_uri
    cfg = smoke_config(
        tmp_path, f"mlflow.tracking_uri={mlflow_server}", "mlflow.experiment=pipeline"
    )
    tracker = Tracker(cfg.mlflow)
    listing = pipeline.prepare_listing(cfg)
    assert len(listing.images) == cfg.data.demo_n
    with pytest.raises(RegistryError, match="champion"):
        load_predictor(cfg, tracker, "models:/emotr@champion")

    result = pipeline.run(cfg, tracker, listing)
    # emotr says what it registered; MLflow's own registration lines stay off the console.
    console = "".join(capfd.readouterr())
    for noise in ("already exists. Creating a new version", "Created version '"):
        assert noise not in console

    client = MlflowClient(mlflow_server)
    challenger = client.get_model_version_by_alias("emotr", "challenger")
    assert str(challenger.version) == result.model_version
    # The first version meets no champion: the gate promotes it.
    assert client.get_model_version_by_alias("emotr", "champion").version == challenger.version
    assert "no champion yet" in result.promotion
    assert challenger.tags["promotion.decision"] == "promoted"
    assert set(METADATA) <= set(challenger.tags)
    assert challenger.tags["split_digest"] == listing.digest
    assert len(challenger.tags["weights_sha256"]) == 64
    assert challenger.tags["input_size"] == "32x32"
    runs = tracker.find_runs(f"tags.mlflow.parentRunId = '{result.pipeline_run_id}'")
    assert {run.info.run_name for run in runs} >= {"extract", "tune"}
    pipeline_run = client.get_run(result.pipeline_run_id)
    assert pipeline_run.info.status == "FINISHED"
    assert pipeline_run.data.metrics["best_val_auc"] == pytest.approx(result.best_val_auc)
    artifacts = {item.path for item in client.list_artifacts(result.pipeline_run_id, "data")}
    assert "data/listing.csv" in artifacts

    # Lineage: the version's run is the best trial, which logged its split as a dataset.
    trial_run = client.get_run(challenger.run_id)
    assert trial_run.info.run_name == f"trial-{result.best_trial_number}"
    (dataset_input,) = trial_run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == listing.digest[:32]

    # The deployable model, loaded as anyone would, gives the trial's validation probabilities.
    model = mlflow.pyfunc.load_model("models:/emotr@champion")
    validation = load_validation_set(tracker, challenger)
    served = model.predict(pd.DataFrame({"path": validation["path"]}))
    assert served["error"].isna().all()
    features = load_feature_set(
        cfg.cache.root, cfg.tune, listing, challenger.tags["feature_fingerprint"]
    )
    head = mlflow.keras.load_model(f"runs:/{challenger.run_id}/model")
    trained = np.asarray(head(features.x_val, training=False)).reshape(-1)
    order = listing.val().set_index("sha256").loc[validation["sha256"]]
    assert (order["label"].to_numpy() == features.y_val).all()
    np.testing.assert_allclose(served["p_positive"].to_numpy(dtype=float), trained, atol=1e-4)

    images = sorted(Path(cfg.data.root).rglob("*.jpg"))[:2]
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    paths = [str(p) for p in [*images, bad]]
    (rows,) = predict_chunks(load_predictor(cfg, tracker, "models:/emotr@champion"), paths)
    assert rows["path"].tolist() == paths
    assert rows["p_positive"][:2].between(0, 1).all()
    assert set(rows["label"][:2]) <= set(cfg.data.classes)
    assert np.isnan(rows["p_positive"][2]) and "not an image" in rows["error"][2]


def test_rerun_extracts_nothing_and_resumes_the_study(tmp_path: Path, ray_local):
    cfg = smoke_config(tmp_path, "tune.n_trials=2")
    tracker = Tracker(cfg.mlflow)
    listing = pipeline.prepare_listing(cfg)
    first = pipeline.run(cfg, tracker, listing)
    again = smoke_config(tmp_path, "tune.n_trials=3")
    second = pipeline.run(again, Tracker(again.mlflow), pipeline.prepare_listing(again))
    assert second.model_version == str(int(first.model_version) + 1)
    extract_runs = tracker.find_runs("attributes.run_name = 'extract'")
    n_extracted = sorted(run.data.metrics["n_extracted"] for run in extract_runs)
    assert n_extracted == [0, len(listing.images)]
