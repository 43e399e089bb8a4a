"""Shared fixtures: the real config shrunk for tests, the demo images, one local Ray, real mlflow,
S3 and PostgreSQL servers (their processes are tests/services.py's)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from emotr.config import Config
from emotr.config_io import load_config
from emotr.data.demo import generate_demo_dataset
from emotr.data.imageio import decode_image
from tests.postgres import Postgres
from tests.services import S3Server, free_port, serving

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "conf" / "smoke.yaml"


def store_overrides(tmp_path: Path) -> list[str]:
    """Overrides that keep every store emotr writes (cache, Optuna, MLflow) under tmp_path."""
    return [
        f"cache.root={tmp_path / 'cache'}",
        f"tune.storage=sqlite:///{tmp_path / 'optuna.db'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"mlflow.artifact_location={tmp_path / 'mlartifacts'}",
    ]


@contextmanager
def warns_in_log(caplog: pytest.LogCaptureFixture, match: str) -> Iterator[list[str]]:
    """pytest.warns for emotr's warnings, which are log lines: yields the WARNING messages
    logged in the block, and fails unless one matches `match`."""
    start, messages = len(caplog.records), []
    with caplog.at_level(logging.WARNING):
        yield messages
    records = caplog.records[start:]
    messages += [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert any(re.search(match, m) for m in messages), f"no warning matching {match!r} logged"


def smoke_config(tmp_path: Path, *overrides: str) -> Config:
    """The smoke config with every path moved under tmp_path, plus extra overrides."""
    paths = [f"data.root={tmp_path / 'data'}", *store_overrides(tmp_path)]
    return load_config([SMOKE], [*paths, *overrides])


def demo_config(tmp_path: Path, *overrides: str, n: int = 24) -> Config:
    """smoke_config with n demo images (data.demo_n=n), generated on the first call per tmp_path."""
    cfg = smoke_config(tmp_path, f"data.demo_n={n}", *overrides)
    if not Path(cfg.data.root).exists():
        generate_demo_dataset(Path(cfg.data.root), n=n, size=tuple(cfg.data.demo_size))
    return cfg


def decoded(cfg: Config, paths) -> np.ndarray:
    """The images at `paths` decoded in this process, as the pipeline decodes them."""
    return np.stack(
        [
            decode_image(
                Path(path).read_bytes(),
                cfg.backbone.input_size,
                max_pixels=cfg.decode.max_pixels,
                background=cfg.decode.background,
                resize=cfg.decode.resize,
            )
            for path in paths
        ]
    )


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance (2 CPUs) shared by every integration test."""
    import ray

    if not ray.is_initialized():
        # address="local": a private instance, never a stray cluster named in Ray's temp folder.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` process on 127.0.0.1 with a SQLite store; yields its URI."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--workers",
        "2",
    ]
    uri = f"http://127.0.0.1:{port}"
    # /health answers only once the store is migrated; polling beats a fixed sleep.
    env = {**os.environ, "MLFLOW_HOME": str(root)}
    with serving(command, f"{uri}/health", root / "server.log", timeout_s=120, env=env):
        yield uri


@pytest.fixture
def fluent_uri(mlflow_server):
    """MLflow's global tracking URI on the test server for one test, then as it was."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_server)
    yield mlflow_server
    mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A moto S3 server process shared by the session; yields an S3Server."""
    root = tmp_path_factory.mktemp("s3-server")
    port = free_port()
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,  # pyarrow's FileSystem.from_uri("s3://...") honours it
        "AWS_EC2_METADATA_DISABLED": "true",  # no credential lookups on a metadata service
    }
    with serving(command, f"{endpoint}/moto-api/", root / "server.log", timeout_s=60):
        yield S3Server(endpoint, env)


@pytest.fixture
def s3_bucket(s3_server, monkeypatch) -> str:
    """A fresh bucket on the session's S3 server, with AWS_* set so s3:// URIs reach it."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return s3_server.new_bucket()


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server for the session (initdb + pg_ctl in a temporary folder)."""
    # Not under pytest's tmp_path: that folder is private to root, and the server may run as
    # another user who must reach its data folder.
    folder = Path(tempfile.mkdtemp(prefix="emotr-pg-"))
    server = Postgres(folder, free_port())
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


# Four emotions, each drawn in its own tint: features of random VGG weights tell tints apart, so
# a head learns them (random weights prove plumbing; the tint makes the labels learnable).
FOUR_CLASSES = ("angry", "happy", "sad", "surprise")
_TINTS = ((200, 40, 40), (230, 200, 40), (40, 60, 200), (40, 190, 90))


def write_class_folders(
    root: Path, classes=FOUR_CLASSES, n_per_class: int = 30, size: int = 48, seed: int = 0
) -> list[Path]:
    """Write root/<class>/img_*.png: each class's tint plus per-image noise; the paths."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        tint = np.array(_TINTS[label % len(_TINTS)], dtype=np.float64)
        for index in range(n_per_class):
            shift = rng.normal(0, 25, 3)
            pixels = tint + shift + rng.normal(0, 40, (size, size, 3))
            path = root / name / f"img_{index:03d}.png"
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
            paths.append(path)
    return paths


def shuffled_label_candidate(cfg: Config, tracker, version, with_test: bool = True):
    """A registry Candidate of a head trained on shuffled labels (a challenger no gate should
    take), logged on a run of its own, on the images `version` was validated (and tested) on."""
    from emotr import pipeline
    from emotr.deploy.package import Candidate
    from emotr.deploy.registry import load_evaluation_set, load_validation_set
    from emotr.search.head import fit_head
    from emotr.search.training_set import load_feature_set
    from emotr.track import keras_model_bytes

    listing = pipeline.prepare_listing(cfg)
    features = load_feature_set(
        cfg.cache.root, cfg.tune, listing, version.tags["feature_fingerprint"]
    )
    shuffled = np.random.default_rng(0).permutation(features.y_train)
    fitted = fit_head(
        cfg.tune.baseline, features.x_train, shuffled, features.x_val, features.y_val,
        epochs=3, patience=3, classes=cfg.data.classes,
    )  # fmt: skip
    run_id = tracker.start_run("shuffled-labels")
    tracker.log_dir_bytes(run_id, keras_model_bytes(fitted.model, features.x_val[:2]), "model")
    tracker.end_run(run_id)
    extra = {"test": load_evaluation_set(tracker, version)[0]} if with_test else {}
    return Candidate(
        run_id=run_id,
        head=cfg.tune.baseline,
        n_features=features.x_val.shape[1],
        feature_fingerprint=features.fingerprint,
        split_digest=features.split_digest,
        study="shuffled",
        trial=0,
        val_auc=fitted.metrics["val_auc"],
        validation=load_validation_set(tracker, version),
        **extra,
    )
