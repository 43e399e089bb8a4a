"""The whole job on a tiny demo set: extract -> tune -> register -> promote -> predict."""

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from emotr import pipeline
from emotr.predict import predict_files
from emotr.registry import RegistryError, promote_model
from emotr.track import Tracker
from tests.conftest import smoke_config

pytestmark = pytest.mark.slow


def test_run_registers_promotes_and_predicts(tmp_path: Path, ray_local, mlflow_server):
    cfg = smoke_config(
        tmp_path, f"mlflow.tracking_uri={mlflow_server}", "mlflow.experiment=pipeline"
    )
    tracker = Tracker(cfg.mlflow)
    listing = pipeline.prepare_listing(cfg)
    assert len(listing.images) == cfg.data.demo_n

    result = pipeline.run(cfg, tracker, listing)

    client = MlflowClient(mlflow_server)
    candidate = client.get_model_version_by_alias("emotr", "candidate")
    assert str(candidate.version) == result.model_version
    runs = tracker.find_runs(f"tags.mlflow.parentRunId = '{result.pipeline_run_id}'")
    assert {run.info.run_name for run in runs} >= {"extract", "tune"}
    pipeline_run = client.get_run(result.pipeline_run_id)
    assert pipeline_run.info.status == "FINISHED"
    assert pipeline_run.data.metrics["best_val_auc"] == pytest.approx(result.best_val_auc)
    artifacts = {item.path for item in client.list_artifacts(result.pipeline_run_id, "data")}
    assert "data/listing.csv" in artifacts

    with pytest.raises(RegistryError, match="champion"):
        predict_files(cfg, tracker, [], "champion")
    promoted = promote_model(cfg, tracker)
    assert client.get_model_version_by_alias("emotr", "champion").version == promoted.version

    images = sorted(Path(cfg.data.root).rglob("*.jpg"))[:2]
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    predictions = predict_files(cfg, tracker, [*images, bad], "champion")
    assert [p.path for p in predictions] == [*images, bad]
    assert all(0.0 <= p.score <= 1.0 and p.class_name in cfg.data.classes for p in predictions[:2])
    assert predictions[2].error


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
