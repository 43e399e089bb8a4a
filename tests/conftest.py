"""Shared fixtures: the real config shrunk for tests, one local Ray, real mlflow, S3 and
PostgreSQL servers."""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
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


@contextmanager
def serving(
    command: list[str],
    ready_url: str,
    log_path: Path,
    timeout_s: float,
    env: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen]:
    """Run a server process until the block ends; ready once `ready_url` answers 200.

    Stops exactly the process it started (terminate, then kill), and names its log on failure.
    """
    import requests

    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    if requests.get(ready_url, timeout=2).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{command[2]} did not start; see {log_path}")
                time.sleep(0.2)
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@dataclass(frozen=True)
class S3Server:
    """A real S3 API (moto's standalone server) on 127.0.0.1, and how to reach it."""

    endpoint: str  # http://127.0.0.1:PORT
    # Any AWS client (pyarrow, boto3, a Ray worker's runtime_env) given these talks to it.
    env: dict[str, str]

    def new_bucket(self) -> str:
        """Create an empty bucket with a unique name; returns its s3:// URI."""
        import pyarrow.fs as pafs

        admin = pafs.S3FileSystem(
            access_key=self.env["AWS_ACCESS_KEY_ID"],
            secret_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region=self.env["AWS_DEFAULT_REGION"],
            endpoint_override=self.endpoint.removeprefix("http://"),
            scheme="http",
            allow_bucket_creation=True,
        )
        name = f"emotr-{uuid.uuid4().hex[:12]}"
        admin.create_dir(name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A moto S3 server process shared by the session; yields an S3Server."""
    root = tmp_path_factory.mktemp("s3-server")
    port = _free_port()
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


def _postgres_bin(name: str) -> str:
    """A PostgreSQL server program: on the PATH, else where Debian's packages put it."""
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if found is None:
        raise RuntimeError(
            f"{name} not found: install PostgreSQL (Debian: apt-get install -y postgresql; "
            ".ci/run does this) or deselect these tests with -m 'not cluster'"
        )
    return found


class Postgres:
    """A PostgreSQL server of the tests' own (initdb in a temporary folder, 127.0.0.1 only).

    Its one user needs a password (scram-sha-256), as on a real cluster. initdb refuses to run
    as root, so under root the server runs as an unprivileged user that owns the folder.
    """

    user = "emotr"

    def __init__(self, folder: Path, port: int):
        self.folder = folder
        self.data = folder / "data"
        self.port = port
        self.host = "127.0.0.1"
        self.password = secrets.token_urlsafe(16)
        self._as_user = self._unprivileged_ids()

    @staticmethod
    def _unprivileged_ids() -> dict:
        if os.geteuid() != 0:
            return {}
        for name in ("postgres", "nobody"):  # `postgres` exists once Debian's package is in
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                continue
            return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        raise RuntimeError("no unprivileged user (postgres, nobody) to run PostgreSQL as")

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        env = {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C.UTF-8", "TZ": "UTC"}
        return subprocess.run(
            args,
            cwd=self.folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            **self._as_user,
        )

    def init(self) -> None:
        """initdb with a password-protected superuser."""
        if self._as_user:
            os.chown(self.folder, self._as_user["user"], self._as_user["group"])
        password_file = self.folder / "password"
        password_file.write_text(self.password + "\n")
        if self._as_user:
            os.chown(password_file, self._as_user["user"], self._as_user["group"])
        result = self._run(
            _postgres_bin("initdb"),
            "-D",
            str(self.data),
            "-U",
            self.user,
            f"--pwfile={password_file}",
            "--auth=scram-sha-256",
            "-E",
            "UTF8",
            "--no-sync",
        )
        password_file.unlink()
        if result.returncode:
            raise RuntimeError(f"initdb failed: {result.stderr[-2000:]}")

    def start(self) -> None:
        """Start the server on 127.0.0.1:port; its socket stays in the folder, not /var/run."""
        options = (
            f"-p {self.port} -c listen_addresses={self.host} "
            f"-c unix_socket_directories={self.folder} -c fsync=off"
        )
        log = str(self.folder / "server.log")
        result = self._run(
            _postgres_bin("pg_ctl"), "-D", str(self.data), "-l", log, "-o", options, "-w", "start"
        )
        if result.returncode:
            raise RuntimeError(f"PostgreSQL did not start: {result.stderr}; see {log}")

    def stop(self) -> None:
        """Stop exactly this server (pg_ctl acts on the postmaster.pid of its data folder)."""
        if (self.data / "postmaster.pid").exists():
            self._run(_postgres_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    @contextmanager
    def stopped(self):
        """The server stopped for the block (a database host that is down), then started again."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    @property
    def env(self) -> dict[str, str]:
        """What libpq (psycopg, SQLAlchemy, Optuna, MLflow) reads the password from."""
        return {"PGPASSWORD": self.password}

    def url(self, database: str, password: bool = False) -> str:
        """postgresql://emotr@127.0.0.1:PORT/database; the password only when asked for."""
        secret = f":{self.password}" if password else ""
        return f"postgresql://{self.user}{secret}@{self.host}:{self.port}/{database}"

    def new_database(self) -> str:
        """Create an empty database with a unique name; returns the name."""
        import psycopg

        name = f"emotr_{uuid.uuid4().hex[:12]}"
        # autocommit: CREATE DATABASE cannot run in a transaction
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return name

    def dsn(self, database: str) -> str:
        """A libpq connection string with the password, for the tests' own connections."""
        return (
            f"host={self.host} port={self.port} user={self.user} password={self.password} "
            f"dbname={database} connect_timeout=5"
        )


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server for the session (initdb + pg_ctl in a temporary folder)."""
    # Not under pytest's tmp_path: that folder is private to root, and the server may run as
    # another user who must reach its data folder.
    folder = Path(tempfile.mkdtemp(prefix="emotr-pg-"))
    server = Postgres(folder, _free_port())
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
