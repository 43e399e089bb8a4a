"""Real server processes for the tests (any server, moto's S3, a `ray start` cluster), and how
tests wait for them and stop them (tests/postgres.py holds the PostgreSQL server).

Every helper stops only what a test started: a process it holds, that process's session, or the
descendants of processes it names. pyarrow is imported where it is used, so that a unit-test run
(which loads tests/conftest.py, and so this module) does not import it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import psutil
import requests

if TYPE_CHECKING:
    import pyarrow.fs as pafs

T = TypeVar("T")

BIN = Path(sys.executable).parent  # the venv whose `python`, `ray` and `mlflow` the cluster runs


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(url: str, headers: dict[str, str] | None = None) -> bool:
    """Whether `url` answers a GET with 200 (False while nothing listens there)."""
    try:
        return requests.get(url, headers=headers, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def wait_for(
    what: str,
    ready: Callable[[], T],
    timeout_s: float,
    process: subprocess.Popen | None = None,
    log: Path | None = None,
) -> T:
    """Poll `ready()` until it returns something true, and return that.

    Fails naming `what` (and the end of `log`) on timeout, or as soon as `process` exits.
    """
    deadline = time.monotonic() + timeout_s
    while not (value := ready()):
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}{_tail(log)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout_s} s{_tail(log)}")
        time.sleep(0.1)  # short: some tests act on the first sign of progress
    return value


def _tail(log: Path | None) -> str:
    if log is None or not log.exists():
        return ""
    return f"; end of {log}:\n{log.read_text(errors='replace')[-3000:]}"


def stop_processes(
    roots: list[psutil.Process], marker: str | None = None, grace_s: float = 5.0
) -> None:
    """Stop these processes, all their descendants and any whose command line names `marker`.

    SIGTERM first, SIGKILL for those still alive after `grace_s` (0: SIGKILL straight away).
    """
    found: set[psutil.Process] = set()
    for root in roots:
        try:
            found |= {root, *root.children(recursive=True)}
        except psutil.NoSuchProcess:
            continue
    if marker:  # a Ray process whose parent already exited still names its --temp-dir
        for process in psutil.process_iter(["cmdline"]):
            if any(marker in part for part in process.info["cmdline"] or []):
                found.add(process)
    alive = list(found)
    if grace_s > 0:
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.terminate()
        _, alive = psutil.wait_procs(alive, timeout=grace_s)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=30)


def stop_session(process: subprocess.Popen, grace_s: float = 20) -> None:
    """Stop a process started with start_new_session=True together with its session's members.

    SIGTERM to the process group, SIGKILL to it if the leader is still alive after `grace_s`.
    """
    with contextlib.suppress(ProcessLookupError):  # the whole group is gone already
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextmanager
def serving(
    command: list[str],
    ready_url: str,
    log_path: Path,
    timeout_s: float,
    env: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen]:
    """Run a server process until the block ends; ready once `ready_url` answers 200.

    The server runs in a session of its own, so that stopping it stops the workers it started
    too (mlflow's uvicorn), and nothing else; its log is named on failure.
    """
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            what = f"{command[2]} at {ready_url}"
            wait_for(what, lambda: answers(ready_url), timeout_s, process, log_path)
            yield process
        finally:
            stop_session(process)


@dataclass(frozen=True)
class S3Server:
    """A real S3 API (moto's standalone server) on 127.0.0.1, and how to reach it."""

    endpoint: str  # http://127.0.0.1:PORT
    # Any AWS client (pyarrow, boto3, a Ray worker's runtime_env) given these talks to it.
    env: dict[str, str]

    def filesystem(self, **options: object) -> pafs.S3FileSystem:
        """A pyarrow filesystem on this server with its credentials (plus pyarrow `options`)."""
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(
            access_key=self.env["AWS_ACCESS_KEY_ID"],
            secret_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region=self.env["AWS_DEFAULT_REGION"],
            endpoint_override=self.endpoint.removeprefix("http://"),
            scheme="http",
            **options,
        )

    def new_bucket(self) -> str:
        """Create an empty bucket with a unique name; returns its s3:// URI."""
        admin = self.filesystem(allow_bucket_creation=True)
        name = f"emotr-{uuid.uuid4().hex[:12]}"
        admin.create_dir(name)
        return f"s3://{name}"


class RayCluster:
    """`ray start --head` and a second `ray start --address` node, each with its own temp dir."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.token = env["RAY_AUTH_TOKEN"]
        # Short folders: Ray's socket paths below them must fit in 107 bytes.
        self.temp = Path(tempfile.mkdtemp(prefix="emotr-ray-", dir="/tmp"))
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.processes: list[subprocess.Popen] = []

    def _ray_start(self, name: str, *args: str) -> subprocess.Popen:
        # Every port of its own: other Ray instances may run on this machine.
        ports = [
            "--dashboard-agent-listen-port", str(free_port()),
            "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()),
            "--metrics-export-port", str(free_port()),
        ]  # fmt: skip
        log = open(self.temp / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(
            [str(BIN / "ray"), "start", *args, *ports, "--block", "--disable-usage-stats"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.processes.append(process)
        return process

    def start(self) -> None:
        head = self._ray_start(
            "head", "--head", "--port", str(self.gcs_port), "--num-cpus", "2",
            "--object-store-memory", str(200 * 2**20), "--temp-dir", str(self.temp / "head"),
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
            "--ray-client-server-port", str(free_port()),
        )  # fmt: skip
        wait_for("ray head", lambda: answers(f"{self.dashboard}/api/version", self.auth), 90, head)
        # Its own --temp-dir: sharing the head's lets this node delete the job's working_dir.
        worker = self._ray_start(
            "worker", "--address", self.address, "--num-cpus", "1",
            "--object-store-memory", str(200 * 2**20), "--temp-dir", str(self.temp / "worker"),
        )  # fmt: skip
        wait_for("second ray node", lambda: self.n_nodes() == 2, 90, worker)

    def add_node_without_temp_dir(self) -> None:
        """A third node as users started it: no --temp-dir, so it takes the head's."""
        node = self._ray_start(
            "third", "--address", self.address, "--num-cpus", "0",
            "--object-store-memory", str(100 * 2**20),
        )  # fmt: skip
        wait_for("third ray node", lambda: self.n_nodes() == 3, 90, node)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def address(self) -> str:
        """The GCS address: it answers on every interface, and Ray 2.60 announces the machine's IP
        whatever --node-ip-address says; only the dashboard and job API stay on loopback."""
        return f"127.0.0.1:{self.gcs_port}"

    def n_nodes(self) -> int:
        try:
            url = f"{self.dashboard}/nodes?view=summary"
            response = requests.get(url, headers=self.auth, timeout=5)
            summary = response.json()["data"]["summary"]
        except (requests.RequestException, ValueError, KeyError):
            return 0
        return sum(node["raylet"]["state"] == "ALIVE" for node in summary)

    def _processes_left(self) -> list[int]:
        """Processes whose command line names this cluster's temp dir."""
        return [
            p.pid
            for p in psutil.process_iter(["cmdline"])
            if str(self.temp) in " ".join(p.info["cmdline"] or [])
        ]

    def stop(self) -> None:
        """Stop this cluster's processes only (`ray stop` would stop every Ray on the machine)."""
        roots = [psutil.Process(p.pid) for p in self.processes if p.poll() is None]
        stop_processes(roots, marker=str(self.temp))
        left = self._processes_left()
        for _ in range(3):  # a raylet not yet dead may have started a worker during the sweep
            if not left:
                break
            stop_processes([], marker=str(self.temp))
            left = self._processes_left()
        shutil.rmtree(self.temp, ignore_errors=True)
        assert left == [], f"Ray processes left behind: {left}"
