"""The registered model as users deploy it: the promotion gate, `emotr predict`, `mlflow models
serve` over HTTP. One smoke `emotr run` on the session's mlflow server feeds every test."""

from __future__ import annotations

import base64
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image, ImageOps

from emotr import pipeline
from emotr.deploy.package import register_model
from emotr.deploy.predict import load_predictor, open_cached_features
from emotr.deploy.promote import promote_challenger
from emotr.track import Tracker
from tests.conftest import shuffled_label_candidate, smoke_config
from tests.run_cli import emotr
from tests.services import BIN, free_port, serving

pytestmark = pytest.mark.slow

MODEL = "emotr-deploy"


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, ray_local, mlflow_server):
    """A smoke `emotr run` (its version: challenger and champion) and a config file for the CLI."""
    root = tmp_path_factory.mktemp("deploy")
    overrides = [
        f"mlflow.tracking_uri={mlflow_server}",
        "mlflow.experiment=deploy",
        f"registry.model_name={MODEL}",
        "data.demo_n=40",  # 8 validation images: enough for a bootstrap of both classes
    ]
    cfg = smoke_config(root, *overrides)
    tracker = Tracker(cfg.mlflow)
    listing = pipeline.prepare_listing(cfg)
    result = pipeline.run(cfg, tracker, listing)
    config_file = root / "deploy.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return cfg, tracker, listing, result, config_file


def test_gate_keeps_the_champion_force_promotes_version_rolls_back(deployed):
    cfg, tracker, listing, first, config_file = deployed
    client = MlflowClient(tracker.uri)
    first_version = client.get_model_version(MODEL, first.model_version)
    # Without a test split of its own the gate compares on the validation images (8, not 4).
    candidate = shuffled_label_candidate(cfg, tracker, first_version, with_test=False)
    second = register_model(cfg, tracker, candidate)
    # A retried registration of the same run makes no second version.
    assert register_model(cfg, tracker, candidate).version == second.version
    assert client.get_model_version_by_alias(MODEL, "challenger").version == second.version

    gate = promote_challenger(cfg, tracker, min_delta=0.0)

    assert not gate.decision.promote
    assert "not above min_delta 0" in gate.decision.reason
    assert client.get_model_version_by_alias(MODEL, "champion").version == first.model_version
    tags = client.get_model_version(MODEL, second.version).tags
    assert tags["promotion.decision"] == "not promoted"
    assert float(tags["promotion.delta_low"]) <= 0.0

    forced = emotr("promote", "-c", str(config_file), "--force")
    assert forced.returncode == 0, forced.stderr
    assert "AUC challenger" in forced.stdout and "95 % interval" in forced.stdout
    assert "promoted anyway (--force)" in forced.stdout
    assert client.get_model_version_by_alias(MODEL, "champion").version == second.version

    rollback = emotr("promote", "-c", str(config_file), "--version", first.model_version)
    assert rollback.returncode == 0, rollback.stderr
    assert f"-> version {first.model_version}" in rollback.stdout
    assert client.get_model_version_by_alias(MODEL, "champion").version == first.model_version

    # --data: the gate on every image of a folder (features from the cache: same fingerprint).
    on_folder = emotr("promote", "-c", str(config_file), "--data", cfg.data.root)
    assert on_folder.returncode == 0, on_folder.stderr
    assert f"on {len(listing.images)} images" in on_folder.stdout
    now = client.get_model_version_by_alias(MODEL, "champion").version
    assert f"-> version {now}" in on_folder.stdout


def test_predict_a_folder_with_a_corrupt_file(deployed, tmp_path: Path):
    cfg, tracker, listing, _, config_file = deployed
    folder = tmp_path / "photos"
    folder.mkdir()
    originals = sorted(Path(cfg.data.root).rglob("*.jpg"))
    for image in originals[:3]:  # copies: their bytes are in the feature cache
        shutil.copy(image, folder / f"{image.parent.name}-{image.name}")
    with Image.open(originals[3]) as image:  # new bytes: decoded by the pipeline's actors
        ImageOps.mirror(image).save(folder / "mirrored.jpg", quality=90)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    output = tmp_path / "out" / "predictions.parquet"

    done = emotr(
        "predict", str(folder), "-c", str(config_file), "--model", f"models:/{MODEL}@champion",
        "--output", str(output), "--batch", "2", env=_wide_console(),
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert "5 images, 1 could not be read" in done.stdout
    rows = pd.read_parquet(output)
    # One row per file, whole paths, in input order.
    assert rows["path"].tolist() == sorted(map(str, folder.iterdir()))
    bad = rows[rows["path"].str.endswith("corrupt.jpg")].iloc[0]
    assert "not an image" in bad["error"] or "corrupt image" in bad["error"]
    assert np.isnan(bad["p_positive"]) and pd.isna(bad["label"])
    good = rows[rows["error"].isna()]
    assert len(good) == 4
    assert good["p_positive"].between(0, 1).all() and set(good["label"]) <= set(cfg.data.classes)
    console = done.stdout + done.stderr
    assert "predict: 5/5 images (100%), 1 failed" in console  # progress, as extract logs it
    for noise in ("Epoch", "oneDNN", "Downloading artifacts", "cuda", "cpu_feature_guard", "━"):
        assert noise not in console
    # Nor Ray's: its start-up, Ray Data's plan and the core worker's native line (issue 28).
    for noise in ("Started a local Ray", "Token authentication", "Execution plan", "core_worker"):
        assert noise not in console

    # The job took the copies' features from the cache and decoded the rest in its actors; the
    # deployable model, loaded in process and decoding every file, gives the same answers.
    uri = f"models:/{MODEL}@champion"
    cached = open_cached_features(cfg, tracker, uri)
    assert cached is not None and len(cached.known) == len(listing.images)
    decoded = load_predictor(cfg, tracker, uri).predict(pd.DataFrame({"path": rows["path"]}))
    assert decoded["error"].notna().tolist() == rows["error"].notna().tolist()
    np.testing.assert_allclose(
        rows["p_positive"], decoded["p_positive"].to_numpy(dtype=float), atol=1e-4
    )
    ok = rows["error"].isna()
    assert rows["label"][ok].tolist() == decoded["label"][ok].tolist()


def test_predict_prints_whole_names_and_refuses_a_model_that_is_not_image_in(deployed, tmp_path):
    cfg, tracker, _, first, config_file = deployed
    deep = tmp_path / ("a-folder-name-long-enough-to-be-cut-by-a-narrow-terminal-" * 2)
    deep.mkdir()
    for name in ("same-start-1.jpg", "same-start-2.jpg"):
        shutil.copy(sorted(Path(cfg.data.root).rglob("*.jpg"))[0], deep / name)
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame({"path": [str(deep / "same-start-1.jpg"), "missing.jpg"]}).to_csv(manifest)

    # (Narrower consoles fold the names over several lines, never cut them.)
    shown = emotr(
        "predict", str(manifest), str(deep / "same-start-2.jpg"), "-c", str(config_file),
        env=_wide_console(),
    )  # fmt: skip

    assert shown.returncode == 0, shown.stderr
    for name in ("same-start-1.jpg", "same-start-2.jpg"):
        assert str(deep / name) in shown.stdout
    missing = next(line for line in shown.stdout.splitlines() if "missing.jpg" in line)
    assert "cannot read file" in missing

    head_only = MlflowClient(tracker.uri).get_model_version(MODEL, first.model_version).run_id
    refused = emotr(
        "predict", str(deep), "-c", str(config_file), "--model", f"runs:/{head_only}/model"
    )
    assert refused.returncode == 1
    assert "is not an image-in emotr model" in refused.stderr


def _wide_console() -> dict[str, str]:
    """The environment of a CLI run with its own private Ray and lines that are not wrapped."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    return {**env, "COLUMNS": "500"}


def test_mlflow_models_serve_answers_base64_images(deployed, tmp_path: Path):
    cfg, tracker, _, _, _ = deployed
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}@champion"]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    # MLflow starts `uvicorn` by name: the venv's bin folder first, as in an activated venv.
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracker.uri, "PATH": path}
    ping = f"http://127.0.0.1:{port}/ping"
    with serving(command, ping, tmp_path / "serve.log", timeout_s=240, env=env):
        jpegs = sorted(Path(cfg.data.root).rglob("*.jpg"))[:2]
        images = [base64.b64encode(path.read_bytes()).decode() for path in jpegs]
        images.append(base64.b64encode(b"\xff\xd8\xff truncated").decode())
        body = {"dataframe_split": {"columns": ["image"], "data": [[image] for image in images]}}
        response = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=60)

    assert response.status_code == 200, response.text
    rows = response.json()["predictions"]
    assert len(rows) == 3
    assert all(0.0 <= row["p_positive"] <= 1.0 and not row.get("error") for row in rows[:2])
    assert rows[2]["error"] and rows[2].get("p_positive") is None


# `emotr explain` (issue 21) on the same registered version: added here to reuse its `emotr run`.


def test_explain_writes_overlays_a_contact_sheet_and_the_rows_predict_gives(deployed, tmp_path):
    from emotr.insight.overlay import display_size

    cfg, _, _, first, config_file = deployed
    folder = tmp_path / "faces"
    folder.mkdir()
    for index, image in enumerate(sorted(Path(cfg.data.root).rglob("*.jpg"))[:3]):
        with Image.open(image) as opened:  # new bytes: both jobs decode them in their actors
            ImageOps.mirror(opened).save(folder / f"face-{index}.jpg", quality=90)
    (folder / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(3000))
    out = tmp_path / "explained"
    done = emotr(
        "explain", str(folder), "-c", str(config_file), "--model", first.model_version,
        "--output", str(out), "--batch", "2", env=_wide_console(),
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert "4 images, 1 could not be read; wrote 3 overlays" in done.stdout
    assert "explain: 4/4 images (100%), 1 failed" in done.stdout + done.stderr
    rows = pd.read_csv(out / "explanations.csv")
    assert list(rows.columns) == ["path", "p_negative", "p_positive", "label", "error", "overlay"]
    assert rows["path"].tolist() == sorted(map(str, folder.iterdir()))
    bad = rows[rows["path"].str.endswith("noise.jpg")].iloc[0]
    assert "not an image" in bad["error"] or "corrupt image" in bad["error"]
    assert np.isnan(bad["p_positive"]) and pd.isna(bad["overlay"])
    good = rows[rows["error"].isna()]
    assert good["overlay"].nunique() == 3
    for row in good.itertuples(index=False):
        with Image.open(out / row.overlay) as picture, Image.open(row.path) as original:
            assert picture.format == "PNG"
            # The whole picture at display size, not the backbone's 32x32 input.
            assert picture.size[::-1] == display_size(original.height, original.width)
    with Image.open(out / "contact_sheet.png") as contact:
        assert contact.format == "PNG" and contact.width > 3 * 160

    # The same version through `emotr predict` (its own process and Ray, as a user runs it: a
    # job in this session's shared Ray would leave its actor pool behind for later tests), in
    # batches of the same size.
    table = tmp_path / "predicted.csv"
    done = emotr(
        "predict", "-c", str(config_file), *rows["path"], "--model", first.model_version,
        "--output", str(table), "--batch", "2",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    predicted = pd.read_csv(table)
    assert predicted["path"].tolist() == rows["path"].tolist()
    np.testing.assert_allclose(
        good[["p_negative", "p_positive"]].to_numpy(),
        predicted.loc[rows["error"].isna().to_numpy(), ["p_negative", "p_positive"]].to_numpy(),
        atol=1e-5,
    )
    assert good["label"].tolist() == predicted["label"].dropna().tolist()


def test_run_logged_the_explain_grids_on_the_challengers_run(deployed):
    from emotr.deploy.registry import load_scorer, load_validation_set
    from emotr.insight.grids import choose_images, validation_scores

    cfg, tracker, _, first, _ = deployed
    client = MlflowClient(tracker.uri)
    version = client.get_model_version(MODEL, first.model_version)
    logged = {item.path for item in client.list_artifacts(version.run_id, "explain")}

    # Each grid that has images: the worst errors, the most confident correct ones per class.
    scorer = load_scorer(tracker, version)
    validation = load_validation_set(tracker, version)
    proba = validation_scores(cfg, scorer, version, validation)
    choices = choose_images(
        proba, validation["label"].to_numpy(), scorer.spec.threshold, 16, scorer.spec.classes
    )
    expected = {choice.artifact for choice in choices if len(choice.rows)}
    assert logged == expected and expected  # 8 images: each is an error or a correct one
    for artifact in logged:
        local = client.download_artifacts(version.run_id, artifact)
        with Image.open(local) as grid:
            assert grid.format == "PNG" and grid.height > 160
