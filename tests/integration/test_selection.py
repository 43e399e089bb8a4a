"""The default search end to end (issue 27): block-4 taps and its mirror, the plain peer as a fixed
trial, trials valued by cross-validation over train + val and refitted, the peer and the recipe
scored on the registered version's test images, the ensemble candidate considered."""

from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from emotr import pipeline
from emotr.search.ensemble import OOF_ARTIFACT
from emotr.track import Tracker
from tests.conftest import smoke_config

pytestmark = pytest.mark.slow

# What the smoke config pins back to the one-split search, restored to the defaults (3 folds:
# the 24-image smoke set holds few images of a class in train + val).
DEFAULTS = (
    "extract.taps=[gap5,gap4,gap4_flip]",
    "tune.cv_folds=3",
    "tune.peer=true",
    "tune.ensemble_size=3",
    "tune.search_space.features={type: categorical, choices: [gap4_flipavg, gap4]}",
    "tune.n_trials=5",
    "data.demo_n=48",
)


def test_the_default_search_reports_the_peer_beside_the_registered_model(
    tmp_path: Path, ray_local, fluent_uri
):
    uri = f"mlflow.tracking_uri={fluent_uri}"
    cfg = smoke_config(tmp_path, uri, "mlflow.experiment=selection", *DEFAULTS)
    tracker = Tracker(cfg.mlflow)
    listing = pipeline.prepare_listing(cfg)
    n_train_val = int((listing.images["split"] != "test").sum())
    result = pipeline.run(cfg, tracker, listing)

    client = MlflowClient(fluent_uri)
    runs = tracker.find_runs(f"tags.`optuna.study_name` = '{cfg.tune.study_name}'")
    trials = {run.info.run_name: run for run in runs if run.data.tags.get("emotr.role") == "trial"}
    assert len(trials) == 5
    peer = trials["trial-1"]
    assert peer.data.params["solver"] == "logreg_cv" and peer.data.params["features"] == "gap5"
    assert peer.data.params["standardize"] == "True" and peer.data.params["n_layers"] == "0"
    # Every trial is valued by its folds: mean AUC, spread, out-of-fold rows on its run.
    for run in trials.values():
        metrics = run.data.metrics
        assert metrics["n_folds"] == 3 and metrics["val_auc_std"] >= 0
        with np.load(client.download_artifacts(run.info.run_id, OOF_ARTIFACT)) as saved:
            assert saved["proba"].shape == (n_train_val, 2)
    assert result.peer.startswith(f"{peer.data.metrics['val_auc']:.4f}")
    # The peer and the recipe on the very test images the registered version was scored on.
    numbers = client.get_run(result.pipeline_run_id).data.metrics
    assert numbers["peer_n_test_images"] == numbers["n_test_images"] > 0
    assert numbers["recipe_n_test_images"] == numbers["n_test_images"]
    assert 0 <= numbers["peer_test_auc"] <= 1 and "plain" not in result.test_peer
    assert result.test_peer.startswith("test AUC")
    assert "best_val_auc_std" in numbers
    registered = client.get_run(result.pipeline_run_id).data.tags["registered"]
    assert registered == result.chosen and registered.startswith(("trial", "ensemble of trials"))
