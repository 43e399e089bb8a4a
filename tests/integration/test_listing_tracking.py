"""What a run records about its data: the listing, every conflicting path, and their counts."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from emotr import pipeline
from emotr.data.listing_report import log_listing
from emotr.track import Tracker
from tests.conftest import smoke_config, warns_in_log

pytestmark = pytest.mark.slow


def test_files_under_two_labels_are_an_artifact_with_every_path_and_a_metric(
    tmp_path: Path, mlflow_server, caplog
):
    cfg = smoke_config(
        tmp_path,
        "data.generate_demo=false",
        f"mlflow.tracking_uri={mlflow_server}",
        "mlflow.experiment=listing",
    )
    root = Path(cfg.data.root)
    for label, class_name in enumerate(cfg.data.classes):
        (root / class_name).mkdir(parents=True)
        for index in range(3):
            Image.new("RGB", (8, 8), (label * 100, index * 50, 7)).save(
                root / class_name / f"own{index}.png"
            )
    # Seven copies of one picture under both labels: more than the console warning names.
    for index in range(7):
        class_name = cfg.data.classes[index % 2]
        Image.new("RGB", (8, 8), "white").save(root / class_name / f"copy{index}.png")
    with warns_in_log(caplog, "conflicts.csv"):
        listing = pipeline.prepare_listing(cfg)
    tracker = Tracker(cfg.mlflow)
    with tracker.run("listing") as run_id:
        log_listing(tracker, run_id, cfg, listing)

    client = MlflowClient(mlflow_server)
    local = client.download_artifacts(run_id, "data/conflicts.csv", str(tmp_path / "out"))
    rows = list(csv.DictReader(io.StringIO(Path(local).read_text())))
    assert sorted(Path(row["path"]).name for row in rows) == [f"copy{i}.png" for i in range(7)]
    metrics = client.get_run(run_id).data.metrics
    assert metrics["n_conflict_files"] == 7
    assert metrics["n_conflict_images"] == 1
    assert metrics["n_listed_images"] == 6
