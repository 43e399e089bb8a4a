"""An ensemble version (issue 27): two trials' heads, on different taps, averaged behind one VGG
pass and registered as one MLflow pyfunc version, as users load, predict with and gate it.

Its members are two heads trained here on the demo images (gap5, and gap4+gap5 from the same
tapped pass), each also registered on its own: the ensemble must answer their mean.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from emotr import pipeline
from emotr.deploy.evaluate import score_test_split
from emotr.deploy.package import Candidate, Member, register_model
from emotr.deploy.promote import promote_challenger
from emotr.deploy.registry import load_model, set_alias
from emotr.track import Tracker
from tests.conftest import decoded, demo_config
from tests.run_cli import emotr

pytestmark = pytest.mark.slow

MODEL = "emotr-ensemble"
COLUMNS = ["p_negative", "p_positive"]
# The members: (trial number, features); the first is the ensemble's `head`.
TRIALS = ((3, "gap5"), (7, "gap4+gap5"))


@pytest.fixture(scope="module")
def registered(tmp_path_factory, mlflow_server):
    """Versions of each head alone and of their ensemble, and a config file for the CLI."""
    root = tmp_path_factory.mktemp("ensemble")
    cfg = demo_config(
        root, f"mlflow.tracking_uri={mlflow_server}", "mlflow.experiment=ensemble",
        f"registry.model_name={MODEL}", n=40,
    )  # fmt: skip
    tracker = Tracker(cfg.mlflow)
    listing = pipeline.prepare_listing(cfg)
    train, val = listing.train(), listing.val()
    taps = [_taps(cfg, rows["path"]) for rows in (train, val)]
    candidates = []
    for trial, features in TRIALS:
        head = cfg.tune.baseline.model_copy(update={"features": features, "standardize": True})
        candidates.append(_trained(cfg, tracker, head, trial, taps, train, val))
    singles = [register_model(cfg, tracker, candidate) for candidate in candidates]
    members = tuple(Member(c.run_id, c.head, c.n_features, c.trial) for c in candidates)
    run_id = tracker.start_run("ensemble")  # emotr run's: a run under the search's tune run
    tracker.end_run(run_id)
    ensemble = register_model(
        cfg, tracker, dataclasses.replace(candidates[0], run_id=run_id, members=members)
    )
    config_file = root / "ensemble.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return cfg, tracker, val, singles, ensemble, config_file


def _taps(cfg, paths) -> dict[str, np.ndarray]:
    """gap4 and gap5 of the images, from one tapped pass of the (seeded random) backbone."""
    from emotr.extract.backbone import FeatureExtractor

    extractor = FeatureExtractor(cfg.backbone, outputs=("gap4", "gap5"))
    return extractor.extract_outputs(decoded(cfg, paths))


def _trained(cfg, tracker, head, trial: int, taps, train, val) -> Candidate:
    """A head fitted on its features of the taps, logged as `model` on a run of its own."""
    from emotr.search.head import fit_head
    from emotr.taps import combine_features
    from emotr.track import keras_model_bytes

    x_train, x_val = (combine_features(head.features, values) for values in taps)
    fitted = fit_head(
        head, x_train, train["label"].to_numpy(), x_val, val["label"].to_numpy(),
        epochs=5, patience=5, classes=cfg.data.classes,
    )  # fmt: skip
    run_id = tracker.start_run(f"trial-{trial}")
    tracker.log_dir_bytes(run_id, keras_model_bytes(fitted.model, x_val[:2]), "model")
    tracker.end_run(run_id)
    return Candidate(
        run_id=run_id,
        head=head,
        n_features=x_val.shape[1],
        feature_fingerprint="not-cached",
        split_digest="demo",
        study="ensemble-test",
        trial=trial,
        val_auc=fitted.metrics["val_auc"],
        validation=val[["path", "sha256", "label"]],
    )


def _answers(tracker, version: str, paths) -> np.ndarray:
    uri = f"models:/{MODEL}/{version}"  # mlflow.pyfunc.load_model on the test's server
    rows = load_model(tracker, uri).predict(pd.DataFrame({"path": list(paths)}))
    return rows[COLUMNS].to_numpy(dtype=float)


def test_ensemble_version_answers_the_mean_of_its_heads_versions(registered):
    _, tracker, val, singles, ensemble, _ = registered
    version = MlflowClient(tracker.uri).get_model_version(MODEL, ensemble.version)
    assert json.loads(version.tags["ensemble_trials"]) == [3, 7]
    assert json.loads(version.tags["features"]) == ["gap5", "gap4+gap5"]
    assert "feature_fingerprint" not in version.tags  # predict and the gate decode its images
    assert version.description.startswith("ensemble of trials 3, 7 of study ensemble-test")
    assert version.run_id != singles[0].run_id

    paths = val["path"].tolist()
    each = [_answers(tracker, single.version, paths) for single in singles]
    np.testing.assert_allclose(
        _answers(tracker, ensemble.version, paths), (each[0] + each[1]) / 2, atol=1e-6
    )
    assert not np.allclose(each[0], each[1], atol=1e-3)  # two heads that disagree


def test_predict_and_explain_an_ensemble_version(registered, tmp_path: Path):
    _, tracker, val, _, ensemble, config_file = registered
    folder = tmp_path / "photos"
    folder.mkdir()
    sources = val["path"].tolist()[:3]
    for index, path in enumerate(sources):
        shutil.copy(path, folder / f"face-{index}.jpg")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    output = tmp_path / "predicted.csv"
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}

    done = emotr(
        "predict", str(folder), "-c", str(config_file), "--model", ensemble.version,
        "--output", str(output), "--batch", "2", env=env,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert "4 images, 1 could not be read" in done.stdout
    rows = pd.read_csv(output)
    assert rows["path"].tolist() == sorted(map(str, folder.iterdir()))
    assert rows["error"].notna().tolist() == [True, False, False, False]
    np.testing.assert_allclose(
        rows[COLUMNS][1:].to_numpy(dtype=float),
        _answers(tracker, ensemble.version, sources),
        atol=1e-5,
    )

    refused = emotr(
        "explain", str(folder), "-c", str(config_file), "--model", ensemble.version,
        "--output", str(tmp_path / "explained"), env=env,
    )  # fmt: skip
    assert refused.returncode == 1
    assert "an ensemble of 2 heads has no class activation map" in refused.stderr


def test_gate_and_test_score_decode_for_an_ensemble(registered):
    cfg, tracker, val, singles, ensemble, _ = registered
    set_alias(tracker, MODEL, cfg.registry.champion_alias, singles[0].version)

    gate = promote_challenger(cfg, tracker, min_delta=0.0)  # the ensemble is the challenger

    assert gate.challenger.version == ensemble.version and gate.split == "validation"
    assert gate.comparison is not None and gate.comparison.n_images == len(val)
    version = MlflowClient(tracker.uri).get_model_version(MODEL, ensemble.version)
    score = score_test_split(cfg, tracker, version, val)
    assert score is not None and score.n_images == len(val)
