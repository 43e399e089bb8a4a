"""The cluster path for real: PostgreSQL, an S3 endpoint, `mlflow server`, two `ray start` nodes
and `ray job submit` of jobs/run.py with conf/cluster.yaml, each a real process that the tests
start and stop (only their own: by pid, by process group, or pg_ctl on their own data folder)."""

from __future__ import annotations

import io
import os
import secrets
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np
import psycopg
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import requests
from PIL import Image

from emotr.data.demo import generate_demo_dataset
from tests.conftest import REPO
from tests.integration.test_doctor import check_lines
from tests.services import BIN, RayCluster, answers, free_port, stop_session, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

CLUSTER = REPO / "conf" / "cluster.yaml"
N_IMAGES = 24


def test_postgres_server_needs_its_password_and_can_be_stopped(postgres_server):
    name = postgres_server.new_database()
    with psycopg.connect(postgres_server.dsn(name)) as connection:
        assert connection.info.server_version >= 150000
    wrong = postgres_server.dsn(name).replace(postgres_server.password, "wrong")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong)
    with postgres_server.stopped(), pytest.raises(psycopg.OperationalError):
        psycopg.connect(postgres_server.dsn(name))
    psycopg.connect(postgres_server.dsn(name)).close()


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    """A bucket holding the demo images under images/<class>/ (the cache goes next to them)."""
    uri = s3_server.new_bucket()
    with tempfile.TemporaryDirectory() as folder:
        generate_demo_dataset(Path(folder) / "demo", n=N_IMAGES, size=(64, 80), seed=0)
        s3 = s3_server.filesystem()
        for class_name in ("negative", "positive"):
            target = f"{uri.removeprefix('s3://')}/images/{class_name}"
            pafs.copy_files(str(Path(folder) / "demo" / class_name), target, None, s3)
    return uri


@pytest.fixture(scope="module")
def cluster_env(s3_server, postgres_server) -> dict[str, str]:
    """The environment every cluster process starts with: credentials as docs/cluster.md says."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "PG"))}
    return {
        **env,
        **s3_server.env,
        **postgres_server.env,  # PGPASSWORD: libpq in the job's driver and the MLflow server
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # the job's `python` is the venv's
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
        "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint,
        "EMOTR_DEBUG": "1",  # tracebacks in the job logs if it fails
    }


@pytest.fixture(scope="module")
def mlflow_pg(cluster_env, postgres_server, bucket, tmp_path_factory):
    """`mlflow server` with a PostgreSQL backend store and an S3 artifact root; yields its URI.

    Started here and awaited in `services`, so that Ray starts while it migrates its database.
    """
    folder = tmp_path_factory.mktemp("mlflow-pg")
    port = free_port()
    backend = postgres_server.url(postgres_server.new_database())  # password: PGPASSWORD
    log = open(folder / "server.log", "wb")  # noqa: SIM115 - closed at teardown
    process = subprocess.Popen(
        [
            str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", backend, "--artifacts-destination", f"{bucket}/mlartifacts",
            "--workers", "1",
        ],
        env={**cluster_env, "MLFLOW_HOME": str(folder)},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}", process, folder / "server.log"
    finally:
        stop_session(process, grace_s=5)  # its own session: the server and its workers
        log.close()


@pytest.fixture(scope="module")
def services(cluster_env, mlflow_pg):
    """The Ray cluster (head + second node) and the MLflow server, both answering."""
    uri, server, server_log = mlflow_pg
    cluster = RayCluster(cluster_env)
    try:
        cluster.start()
        wait_for("mlflow server", lambda: answers(f"{uri}/health"), 180, server, server_log)
        yield cluster, uri
    finally:
        cluster.stop()


def job_overrides(bucket: str, tracking_uri: str, storage: str, n_trials: int) -> list[str]:
    """conf/cluster.yaml pointed at the test's services, at smoke sizes (conf/smoke.yaml)."""
    return [
        f"data.root={bucket}/images",
        f"cache.root={bucket}/cache",
        f"mlflow.tracking_uri={tracking_uri}",
        f"tune.storage={storage}",
        "backbone.weights=none",
        "backbone.input_size=[32,32]",
        "backbone.precision=float32",
        "extract.batch_size=8",
        "extract.decode_batch_size=4",
        "extract.commit_every=8",
        "extract.keras_backend=tensorflow",  # the venv's; jax compiles VGG16 for seconds more
        f"tune.n_trials={n_trials}",
        "tune.concurrency=2",
        "tune.epochs=3",
        "tune.early_stopping_patience=2",
    ]


def ray_cli(cluster: RayCluster, *args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ray"), "job", *args],
        cwd=REPO,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def submit(cluster: RayCluster, overrides: list[str], log_folder: Path) -> str:
    """`ray job submit --working-dir .` of jobs/run.py; waits for SUCCEEDED, returns its logs."""
    submission = f"emotr-test-{uuid.uuid4().hex[:8]}"
    entrypoint = ["python", "jobs/run.py", "-c", "conf/cluster.yaml", *overrides]
    address = ["--address", cluster.dashboard]
    ray_cli(
        cluster, "submit", *address, "--submission-id", submission, "--working-dir", ".",
        "--", *entrypoint, timeout=400,
    )  # fmt: skip
    logs = ray_cli(cluster, "logs", *address, submission).stdout
    (log_folder / f"{submission}.log").write_text(logs)
    job = requests.get(f"{cluster.dashboard}/api/jobs/{submission}", headers=cluster.auth).json()
    assert job["status"] == "SUCCEEDED", f"{job.get('message')}\n{logs[-6000:]}"
    return logs


def cache_parts(s3: pafs.S3FileSystem, bucket: str) -> dict[str, int]:
    """The cache's Parquet parts in the bucket, with their rows."""
    selector = pafs.FileSelector(f"{bucket.removeprefix('s3://')}/cache", recursive=True)
    parts = [
        info.path
        for info in s3.get_file_info(selector)
        if info.base_name.startswith("part-") and info.base_name.endswith(".parquet")
    ]
    return {path: pq.read_metadata(path, filesystem=s3).num_rows for path in parts}


def recorded_texts(client, experiment_id: str, folder: Path) -> list[bytes]:
    """Everything the runs of an experiment recorded: params, tags and every artifact's bytes."""
    texts = []
    for run in client.search_runs([experiment_id], max_results=1000):
        texts += [value.encode() for value in (*run.data.params.values(), *run.data.tags.values())]
        local = Path(client.download_artifacts(run.info.run_id, "", str(folder / run.info.run_id)))
        texts += [path.read_bytes() for path in local.rglob("*") if path.is_file()]
    return texts


def test_a_submitted_job_runs_on_the_cluster_and_a_second_one_resumes(
    services, bucket, postgres_server, s3_server, tmp_path
):
    import optuna
    from mlflow.tracking import MlflowClient

    ray_cluster, mlflow_pg = services

    study_db = postgres_server.new_database()
    password = postgres_server.password
    # First as a user who wrote the password into the DSN: emotr must not repeat it anywhere.
    inline = postgres_server.url(study_db, password=True)
    first = submit(ray_cluster, job_overrides(bucket, mlflow_pg, inline, n_trials=2), tmp_path)

    client = MlflowClient(mlflow_pg)
    experiment = client.get_experiment_by_name("emotr")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    by_name = {}
    for run in runs:
        by_name.setdefault(run.info.run_name, []).append(run)
    assert [run.info.status for run in by_name["pipeline"]] == ["FINISHED"]
    assert [run.info.status for run in by_name["extract"]] == ["FINISHED"]
    trials = [run for run in runs if "optuna.trial_number" in run.data.tags]
    assert len(trials) >= 2 and all(run.info.status == "FINISHED" for run in trials)
    versions = client.search_model_versions("name='emotr'")
    assert [version.run_id in {run.info.run_id for run in runs} for version in versions] == [True]

    s3 = s3_server.filesystem()
    parts = cache_parts(s3, bucket)
    rows_by_folder: dict[str, int] = {}
    for path, rows in parts.items():
        folder = path.rsplit("/", 2)[-2]
        rows_by_folder[folder] = rows_by_folder.get(folder, 0) + rows
    # One folder per default tap (gap5, gap4, gap4_flip), every image once in each.
    assert len(rows_by_folder) == 3 and set(rows_by_folder.values()) == {N_IMAGES}
    artifacts = s3.get_file_info(pafs.FileSelector(f"{bucket[5:]}/mlartifacts", recursive=True))
    assert any(info.base_name == "config.yaml" for info in artifacts)  # via the server, in S3

    storage = postgres_server.url(study_db, password=True)
    study = optuna.load_study(study_name="emotr", storage=storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    first_trials = [(t.number, t.params, t.value) for t in study.trials]

    # Then as docs/cluster.md says: no password in the DSN; the driver's libpq reads PGPASSWORD.
    plain = postgres_server.url(study_db)
    second = submit(ray_cluster, job_overrides(bucket, mlflow_pg, plain, n_trials=3), tmp_path)
    extracts = client.search_runs(
        [experiment.experiment_id], "tags.mlflow.runName = 'extract'", order_by=["start_time DESC"]
    )
    assert extracts[0].data.metrics["n_extracted"] == 0
    assert cache_parts(s3, bucket) == parts  # nothing extracted, nothing written
    study = optuna.load_study(study_name="emotr", storage=storage)
    assert [(t.number, t.params, t.value) for t in study.trials[:2]] == first_trials
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3

    # The password is nowhere: artifacts, params, tags, job logs, and the cluster's log files,
    # but for the entrypoint itself that Ray echoes (as submitted, not emotr's doing).
    submitted = f"tune.storage={inline}".encode()
    recorded = recorded_texts(client, experiment.experiment_id, tmp_path)
    recorded += [str(version).encode() for version in client.search_model_versions("name='emotr'")]
    assert [text for text in recorded if password.encode() in text] == []
    logs = [first.encode(), second.encode()]
    logs += [
        p.read_bytes()
        for p in ray_cluster.temp.rglob("*")
        if p.is_file() and p.suffix in {".log", ".out", ".err"}
    ]
    leaks = [text for text in logs if password.encode() in text.replace(submitted, b"")]
    assert leaks == []
    pipeline = by_name["pipeline"][0].info.run_id
    config_yaml = Path(client.download_artifacts(pipeline, "config.yaml", str(tmp_path / "cfg")))
    assert "storage: postgresql://emotr:***@127.0.0.1:" in config_yaml.read_text()  # redacted


def jpeg_bytes(seed: int) -> bytes:
    """A real JPEG file's bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 60, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_the_built_serve_config_deploys_with_serve_deploy_and_serves_the_champion(
    services, bucket, postgres_server, tmp_path
):
    from mlflow.tracking import MlflowClient

    cluster, mlflow_uri = services
    client = MlflowClient(mlflow_uri)
    storage = postgres_server.url(postgres_server.new_database())
    overrides = job_overrides(bucket, mlflow_uri, storage, n_trials=2)
    if not client.search_model_versions("name='emotr'"):  # this test alone: register one
        submit(cluster, overrides, tmp_path)
    champion = client.get_model_version_by_alias("emotr", "champion").version
    port, serve_file = free_port(), tmp_path / "serve.yaml"
    serve_overrides = [f"serve.port={port}", "serve.challenger=null", "serve.replicas=1"]

    built = subprocess.run(
        [sys.executable, "-m", "emotr.cli", "serve", "-c", str(CLUSTER), *overrides,
         *serve_overrides, "--build", str(serve_file)],
        cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    serve_cli = [str(BIN / "serve")]
    deployed = subprocess.run(
        [*serve_cli, "deploy", str(serve_file), "--address", cluster.dashboard],
        env=cluster.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    try:
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        url = f"http://127.0.0.1:{port}"
        wait_for("the served application", lambda: answers(f"{url}/healthz"), 240)
        answer = requests.post(
            f"{url}/predict", files={"file": ("a.jpg", jpeg_bytes(0), "image/jpeg")}, timeout=60
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"]["version"] == str(champion)
        assert answer.json()["rows"][0]["label"] in ("negative", "positive")
    finally:
        subprocess.run(
            [*serve_cli, "shutdown", "-y", "--address", cluster.dashboard],
            env=cluster.env, capture_output=True, timeout=120,
        )  # fmt: skip


def doctor(cluster: RayCluster, *overrides: str) -> subprocess.CompletedProcess:
    """`emotr doctor -c conf/cluster.yaml` from this machine, with the cluster's environment."""
    return subprocess.run(
        [sys.executable, "-m", "emotr.cli", "doctor", "-c", str(CLUSTER), *overrides,
         f"ray.address={cluster.address}"],
        cwd=REPO,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip


def test_doctor_is_green_on_the_cluster_and_names_each_broken_store_with_its_fix(
    services, bucket, postgres_server, tmp_path
):
    cluster, mlflow_uri = services
    study_db = postgres_server.new_database()
    overrides = job_overrides(bucket, mlflow_uri, postgres_server.url(study_db), n_trials=2)
    green = doctor(cluster, *overrides)
    assert green.returncode == 0, green.stdout + green.stderr
    lines = check_lines(green.stdout)
    assert [line[0] for line in lines.values()] == ["✓"] * 8, green.stdout
    assert f"{N_IMAGES} images (" in lines["data"]
    assert "writable" in lines["cache"] and "writable" in lines["artifacts"]
    assert "MLflow 3." in lines["tracking"] and "server" in lines["tracking"]
    assert "reachable, no tables yet" in lines["optuna"]
    assert "2 node(s), 3 CPUs" in lines["ray"]

    broken = [
        *overrides,
        "cache.root=s3://no-such-bucket-for-emotr/cache",
        f"backbone.weights={tmp_path / 'vgg16_notop.weights.h5'}",
    ]
    with postgres_server.stopped():
        red = doctor(cluster, *broken)
    assert red.returncode == 1
    lines = check_lines(red.stdout)
    for name in ("weights", "cache", "optuna"):
        assert lines[name].startswith("✗") and "; fix: " in lines[name], red.stdout
    assert "vgg16_notop.weights.h5" in lines["weights"]
    assert "no-such-bucket-for-emotr" in lines["cache"] and "bucket must exist" in lines["cache"]
    assert "connection failed" in lines["optuna"] and "PGPASSWORD" in lines["optuna"]
    assert lines["ray"].startswith("✓")

    # What broke the job of issue 10: a second node on one host sharing the head's temp dir.
    cluster.add_node_without_temp_dir()
    shared = check_lines(doctor(cluster, *overrides).stdout)["ray"]
    assert shared.startswith("✗ ray") and "2 nodes on " in shared and "own --temp-dir" in shared
