"""Benchmark online serving (issue 28): `emotr serve` against `mlflow models serve` and the bare
scorer, and `emotr serve` through a promotion and a killed replica.

    python jobs/bench_serve.py --photos DIR [--work DIR] [--seconds 45] [--docs]

One registered version (the demo set, hed-bsds500 VGG16 at 224x224, gap5 + the tutorial's head;
`emotr run` registers it in --work, with every store there) is served in turns on this machine:
(a) `emotr serve` (1 replica of serve.cpus_per_replica=2 CPUs, batches of --batch), (b) `mlflow
models serve --env-manager local` (its default workers: one per CPU). jobs/serve_load.py puts a
locust load of single-image requests (the JPEGs of --photos, 127.0.0.1 only) on each at 1, 4 and
16 clients: requests/s, p50/p95/p99, failures. (c) The bare scorer: that version's VGG and head in
this process on batches of decoded images, its images/s the limit. Then (d) with 2 replicas of 1
CPU, 4 clients for --fault-seconds: `emotr promote --version 2` at --act-at s (failed requests,
changes of the answering version in arrival order), and (e) one replica SIGKILLed at --act-at s
(share answered 200; /healthz 200 and 2 replicas alive again at the end).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests
import yaml
from benchlib import REPO, add_output_arguments, publish

BIN = Path(sys.executable).parent  # `emotr`, and the uvicorn `mlflow models serve` starts
MODEL = "emotr-bench"
REPLICA_TITLE = "ServeReplica:emotr:EmotrServer"  # the title Ray gives a replica's process
LOAD_SCRIPT = Path(__file__).with_name("serve_load.py")


def work_config(work: Path) -> Path:
    """The job's YAML: every store under `work`, the demo set, the real input size, one trial."""
    config = {
        "data": {"root": str(work / "data"), "classes": ["negative", "positive"]},
        "backbone": {"weights": "hed-bsds500", "input_size": [224, 224]},
        "extract": {"taps": ["gap5"]},
        "cache": {"root": str(work / "cache")},
        # The tutorial's recipe alone: the benchmark times serving, not the search.
        "tune": {"n_trials": 1, "cv_folds": 0, "peer": False, "ensemble_size": 0},
        "mlflow": {
            "tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
            "artifact_location": str(work / "artifacts"),
        },
        "registry": {"model_name": MODEL},
        "ray": {"num_cpus": 2},
    }
    config["data"].update({"generate_demo": True, "demo_n": 200})
    config["tune"].update({"search_space": {}, "storage": f"sqlite:///{work / 'optuna.db'}"})
    path = work / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def emotr(config: Path, *args: str) -> None:
    """An `emotr` command as a user types it (it must succeed)."""
    subprocess.run([str(BIN / "emotr"), *args, "-c", str(config)], check=True, cwd=config.parent)


def register_versions(config: Path) -> None:
    """Versions 1 (the champion) and 2 (another split's head) of MODEL, unless registered."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{config.parent / 'mlflow.db'}")
    known = {v.version for v in client.search_model_versions(f"name = '{MODEL}'")}
    if "1" not in known:
        emotr(config, "run", "tune.study_name=bench-serve-1")
    if "2" not in known:
        # Another split gives another head: the promotion's switch shows in the answers.
        overrides = ["tune.study_name=bench-serve-2", "data.seed=1", "registry.auto_promote=false"]
        emotr(config, "run", *overrides)
    emotr(config, "promote", "--version", "1")


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """A server this job started in its own session, and where it answers."""

    process: subprocess.Popen
    url: str
    port: int

    def stop(self) -> None:
        """SIGINT (emotr serve deletes its application and stops Ray), then SIGKILL whatever of
        its process group and descendants lives on; return once the port is free."""
        family = psutil.Process(self.process.pid).children(recursive=True)
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        _, alive = psutil.wait_procs(family, timeout=30)
        for process in alive:
            process.kill()
        while not port_is_free(self.port):
            time.sleep(0.5)


def port_is_free(port: int) -> bool:
    """True when nothing accepts connections on 127.0.0.1:port."""
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def start_server(command: list[str], port: int, ready: str, log: Path, env=None) -> Server:
    """Start a server (its own session, its output to `log`) and wait for `ready` to answer."""
    with log.open("w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    server = Server(process, f"http://127.0.0.1:{port}", port)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{command[0]} ended with {process.returncode}: see {log}")
        try:
            if requests.get(f"{server.url}{ready}", timeout=5).status_code == 200:
                return server
        except requests.RequestException:
            pass
        time.sleep(1)
    server.stop()
    raise SystemExit(f"{server.url}{ready} did not answer 200 in 300 s: see {log}")


def start_emotr_serve(config: Path, replicas: int, cpus: int, batch: int) -> Server:
    """`emotr serve` of the champion: `replicas` replicas of `cpus` CPUs, batches of `batch`."""
    port = free_port()
    command = [str(BIN / "emotr"), "serve", "-c", str(config), f"serve.port={port}"]
    command += [f"serve.replicas={replicas}", f"serve.cpus_per_replica={cpus}"]
    command += [f"serve.max_batch_size={batch}"]
    return start_server(command, port, "/healthz", config.parent / f"serve-{replicas}.log")


def start_mlflow_serve(config: Path) -> Server:
    """`mlflow models serve` of version 1, as the README runs it (.venv/bin first on PATH)."""
    port = free_port()
    command = [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}/1"]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{config.parent / 'mlflow.db'}"
    return start_server(command, port, "/ping", config.parent / "mlflow-serve.log", env)


def start_load(url: str, endpoint: str, clients: int, args, records: Path | None = None):
    """jobs/serve_load.py on `url`, started; returns once its timed part began."""
    command = [sys.executable, str(LOAD_SCRIPT), "--url", url, "--endpoint", endpoint]
    command += ["--photos", str(args.photos), "--clients", str(clients)]
    seconds = args.fault_seconds if records else args.seconds
    command += ["--seconds", str(seconds), "--warmup", str(args.warmup)]
    if records:
        command += ["--records", str(records)]
    load = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    line = load.stdout.readline()
    if "timed part begins" not in line:
        raise SystemExit(f"the load did not start: {line!r}")
    return load


def finish_load(load: subprocess.Popen) -> dict:
    """The load's summary, once it ended."""
    output, _ = load.communicate(timeout=600)
    if load.returncode:
        raise SystemExit(f"the load failed ({load.returncode})")
    return json.loads(output.strip().splitlines()[-1])


def measure(server: Server, endpoint: str, clients: int, args) -> dict:
    """One point: `clients` clients on the endpoint; the summary with the load average."""
    summary = finish_load(start_load(server.url, endpoint, clients, args))
    summary["load"] = os.getloadavg()[0]
    print(f"{endpoint} {clients} clients: {summary}", flush=True)
    return summary


def bare_scorer(config: Path, photos: Path, batch: int, seconds: float) -> float:
    """Images/s of version 1's VGG + head in this process on batches of decoded photos."""
    import mlflow
    import numpy as np

    from emotr.deploy.registry import scorer_of

    mlflow.set_tracking_uri(f"sqlite:///{config.parent / 'mlflow.db'}")
    scorer = scorer_of(mlflow.pyfunc.load_model(f"models:/{MODEL}/1"))
    scorer.extractor.batch_size = batch  # as a replica sets it: one pass per batch
    pixels = np.stack([scorer.decode(p.read_bytes()) for p in sorted(photos.glob("*.jpg"))])
    batches = [pixels[i : i + batch] for i in range(0, len(pixels) - batch + 1, batch)]
    scorer.score_features(scorer.extractor(batches[0]))  # trace the graph before timing
    n_images, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for chunk in batches:
            scorer.score_features(scorer.extractor(chunk))
            n_images += len(chunk)
    return n_images / (time.perf_counter() - started)


def replica_processes(server: Server) -> list[psutil.Process]:
    """The live replica processes of `emotr serve` (descendants of its process)."""
    found = []
    for process in psutil.Process(server.process.pid).children(recursive=True):
        try:
            if any(REPLICA_TITLE in part for part in process.cmdline()):
                found.append(process)
        except psutil.NoSuchProcess:
            continue
    return found


def version_changes(rows: list) -> int:
    """How often the answering version changes, answers in arrival order (errors skipped)."""
    versions = [version for _, status, version, _ in rows if status == 200]
    return sum(1 for before, after in zip(versions, versions[1:], strict=False) if before != after)


def promotion_under_load(server: Server, config: Path, args) -> dict:
    """(d) 4 clients; `emotr promote --version 2` at --act-at s: failures, version changes."""
    records = config.parent / "promotion.json"
    load = start_load(server.url, "predict", 4, args, records)
    time.sleep(args.act_at)
    promoted_at = args.act_at
    emotr(config, "promote", "--version", "2")
    summary = finish_load(load)
    rows = json.loads(records.read_text())
    switched = [row[0] for row in rows if row[1] == 200 and row[2] == "2"]
    summary.update(
        changes=version_changes(rows),
        promoted_at=promoted_at,
        first_v2_at=min(switched) if switched else None,
        load=os.getloadavg()[0],
    )
    print(f"promotion: {summary}", flush=True)
    return summary


def kill_under_load(server: Server, config: Path, args) -> dict:
    """(e) 4 clients; one replica SIGKILLed at --act-at s: answered share, recovery."""
    records = config.parent / "kill.json"
    load = start_load(server.url, "predict", 4, args, records)
    time.sleep(args.act_at)
    replicas = replica_processes(server)
    os.kill(replicas[0].pid, signal.SIGKILL)
    killed_at = time.monotonic()
    summary = finish_load(load)
    rows = json.loads(records.read_text())
    healthy, n_replicas = False, 0
    deadline = time.monotonic() + 120  # Serve restarts the replica: VGG loads again
    while time.monotonic() < deadline and not (healthy and n_replicas == 2):
        time.sleep(2)
        healthy = requests.get(f"{server.url}/healthz", timeout=10).status_code == 200
        n_replicas = len(replica_processes(server))
    summary.update(
        replicas_before=len(replicas),
        answered=sum(1 for row in rows if row[1] == 200) / max(1, len(rows)),
        statuses=sorted({row[1] for row in rows}),
        healthy=healthy,
        replicas_after=n_replicas,
        recovered_s=time.monotonic() - killed_at,
        load=os.getloadavg()[0],
    )
    print(f"kill: {summary}", flush=True)
    return summary
