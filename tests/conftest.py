"""Shared fixtures: the real config shrunk for tests, one local Ray, one real `mlflow server`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emotr.config import Config, load_config

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "conf" / "smoke.yaml"


def smoke_config(tmp_path: Path, *overrides: str) -> Config:
    """The smoke config with every path moved under tmp_path, plus extra overrides."""
    paths = [
        f"data.root={tmp_path / 'data'}",
        f"cache.root={tmp_path / 'cache'}",
        f"tune.storage=sqlite:///{tmp_path / 'optuna.db'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"mlflow.artifact_location={tmp_path / 'mlartifacts'}",
    ]
    return load_config([SMOKE], [*paths, *overrides])


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance (2 CPUs) shared by every integration test."""
    import ray

    if not ray.is_initialized():
        # address="local": a private instance, never a stray cluster named in Ray's temp folder.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` process on 127.0.0.1 with a SQLite store; yields its URI."""
    import requests

    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log = open(root / "server.log", "wb")  # noqa: SIM115 - closed at teardown
    process = subprocess.Popen(
        [
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
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "MLFLOW_HOME": str(root)},
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        # /health answers only once the store is migrated; polling beats a fixed sleep.
        try:
            if requests.get(f"{uri}/health", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"mlflow server did not start; see {root / 'server.log'}")
        time.sleep(0.5)
    yield uri
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()
