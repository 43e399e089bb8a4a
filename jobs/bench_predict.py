"""Benchmark the deployable model: batch predict images/s and memory, serve latency of one image.

    python jobs/bench_predict.py --n 2000 --input 64

(a) The bare extraction core: decode every image, emotr's FeatureExtractor and the head, batch by
batch, in this process, no Ray. (b) `emotr predict`'s job, emotr.deploy.predict.predict_paths, on a
private 2-CPU Ray: extraction's pipeline with the registered version's VGG16 in the actors, the
head on the driver; resident memory of the driver and of the actors after a quarter, half and
all of the images: flat when the batches bound memory. (a) and (b) alternate, so that other work
on a shared machine hits both alike. (b') the `emotr predict DIR --output x.parquet` command once,
end to end (Python, Ray and actor start-up included). (c) `mlflow models serve --env-manager
local`: latency of one-image POSTs (base64 JPEG). Images: the synthetic demo set;
backbone.weights=none (the speed is the same as with real weights).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import requests
import yaml
from benchlib import REPO, add_output_arguments, publish

from emotr.config_io import load_config
from emotr.data.demo import generate_demo_dataset
from emotr.data.imageio import decode_image
from emotr.deploy.package import Candidate, register_model
from emotr.deploy.predict import open_predictor, predict_paths
from emotr.hyperparams import HeadParams
from emotr.search.head import fit_head
from emotr.track import Tracker, keras_model_bytes


def rss_mib(process: psutil.Process) -> float:
    """Resident memory of one process now."""
    return process.memory_info().rss / 2**20


def actors_rss_mib() -> float:
    """Resident memory of this driver's extractor actors (processes named after the operator).

    Only descendants of this process: the private Ray it started, not other users' clusters.
    """
    total = 0.0
    for process in psutil.Process().children(recursive=True):
        try:
            if any("MapWorker" in part for part in process.cmdline()):
                total += rss_mib(process)
        except psutil.NoSuchProcess:
            continue
    return total


def register(work: Path, input_size: int):
    """A registered version: a head fitted on random features, in a SQLite store under work."""
    cfg = load_config(
        [],
        [
            f"mlflow.tracking_uri=sqlite:///{work / 'mlflow.db'}",
            f"mlflow.artifact_location={work / 'artifacts'}",
            f"cache.root={work / 'cache'}",
            "backbone.weights=none",
            f"backbone.input_size=[{input_size},{input_size}]",
            "registry.auto_promote=false",
            "ray.num_cpus=2",
        ],
    )
    tracker = Tracker(cfg.mlflow)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 512)).astype(np.float32), np.arange(64) % 2
    params = HeadParams()
    fitted = fit_head(params, x[:48], y[:48], x[48:], y[48:], epochs=2, patience=2)
    run_id = tracker.start_run("bench-head")
    tracker.log_dir_bytes(run_id, keras_model_bytes(fitted.model, x[:2]), "model")
    tracker.end_run(run_id)
    validation = pd.DataFrame({"path": [], "sha256": [], "label": []})
    candidate = Candidate(run_id, params, 512, "-", "-", "bench", 0, 0.5, validation)
    return cfg, tracker, register_model(cfg, tracker, candidate)


def bench_core(cfg, paths: list[str]) -> float:
    """(a) images/s of decode -> FeatureExtractor -> head in this process (model built first)."""
    from emotr.extract.backbone import FeatureExtractor
    from emotr.search.head import build_head, predict_proba

    batch = cfg.extract.batch_size
    extractor = FeatureExtractor(cfg.backbone, batch_size=batch)
    head = build_head(HeadParams(), 512)
    size, pixels_cap = tuple(cfg.backbone.input_size), cfg.decode.max_pixels
    started = time.perf_counter()
    for start in range(0, len(paths), batch):
        chunk = paths[start : start + batch]
        pixels = np.stack(
            [decode_image(Path(p).read_bytes(), size, max_pixels=pixels_cap) for p in chunk]
        )
        predict_proba(head, extractor(pixels))
    return len(paths) / (time.perf_counter() - started)


def bench_predict(cfg, predictor, paths: list[str]) -> dict:
    """(b) images/s of predict_paths, end to end and after the first rows; RSS at 1/4, 1/2, 1."""
    driver = psutil.Process()
    marks = [len(paths) // 4, len(paths) // 2, len(paths)]
    memory, done, first = [], 0, None
    started = time.perf_counter()
    for frame in predict_paths(cfg, predictor, paths, progress=False):
        if first is None:
            first = (time.perf_counter(), len(frame))
        done += len(frame)
        while marks and done >= marks[0]:
            memory.append((marks.pop(0), rss_mib(driver), actors_rss_mib()))
    ended = time.perf_counter()
    assert done == len(paths), f"{done} rows for {len(paths)} images"
    return {
        "rate": len(paths) / (ended - started),
        "steady": (len(paths) - first[1]) / (ended - first[0]),
        "startup": first[0] - started,
        "memory": memory,
    }


def bench_command(cfg, work: Path, version, folder: Path) -> float:
    """(b') seconds of the `emotr predict` command over the folder, writing a Parquet file."""
    config = work / "bench.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "emotr.cli", "predict", str(folder), "-c", str(config)]
    command += ["--model", str(version.version), "--output", str(work / "out.parquet")]
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def bench_serve(tracker, version, image: Path, n_requests: int) -> list[float]:
    """(c) seconds per one-image POST to `mlflow models serve`, after one warm-up request."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "mlflow", "models", "serve", "--env-manager", "local"]
    command += ["-m", f"models:/{version.name}/{version.version}", "-p", str(port)]
    command += ["-h", "127.0.0.1"]
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracker.uri, "PATH": path}
    server = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    body = {
        "dataframe_split": {
            "columns": ["image"],
            "data": [[base64.b64encode(image.read_bytes()).decode()]],
        }
    }
    try:
        for _ in range(480):
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        requests.post(f"{url}/invocations", json=body, timeout=120).raise_for_status()
        latencies = []
        for _ in range(n_requests):
            started = time.perf_counter()
            requests.post(f"{url}/invocations", json=body, timeout=120).raise_for_status()
            latencies.append(time.perf_counter() - started)
        return latencies
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _memory_text(memory: list) -> str:
    driver = ", ".join(f"{rss:.0f}" for _, rss, _ in memory)
    actors = ", ".join(f"{rss:.0f}" for _, _, rss in memory)
    marks = "/".join(f"{mark:,}" for mark, _, _ in memory)
    return f"after {marks} images: driver {driver} MiB; actor {actors} MiB"


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="images")
    parser.add_argument("--input", type=int, default=64, help="backbone input side (pixels)")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of (b) and (a)")
    parser.add_argument("--requests", type=int, default=30, help="one-image POSTs to time")
    add_output_arguments(parser)
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        generate_demo_dataset(work / "images", n=args.n, size=(96, 120), seed=0)
        paths = sorted(str(p) for p in (work / "images").rglob("*.jpg"))
        cfg, tracker, version = register(work, args.input)
        predictor = open_predictor(cfg, tracker, f"models:/{version.name}/{version.version}")
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        runs, cores = [], []
        for _ in range(args.rounds):
            runs.append(bench_predict(cfg, predictor, paths))
            cores.append(bench_core(cfg, paths))
            run = runs[-1]
            print(
                f"(b) {run['rate']:.1f} img/s ({run['steady']:.1f} after {run['startup']:.1f} s); "
                f"{_memory_text(run['memory'])}; (a) {cores[-1]:.1f} img/s",
                flush=True,
            )
        ray.shutdown()
        command_s = bench_command(cfg, work, version, work / "images")
        latencies = bench_serve(tracker, version, Path(paths[0]), args.requests)
    load_after = os.getloadavg()
    rates = [run["rate"] / core for run, core in zip(runs, cores, strict=True)]
    steadies = [run["steady"] / core for run, core in zip(runs, cores, strict=True)]
    median, p95 = statistics.median(latencies) * 1000, np.percentile(latencies, 95) * 1000
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, load average (1 min) "
        f"{load_before[0]:.1f} before and {load_after[0]:.1f} after"
    )

    def pairs(key: str) -> str:
        return ", ".join(f"{run[key]:.1f}" for run in runs)

    section = (
        f"\n### Deployable model: predict as a Ray Data job, and serve ({datetime.date.today()})"
        f"\n\n`python jobs/bench_predict.py --n {args.n} --input {args.input} --rounds "
        f"{args.rounds} --requests {args.requests}` on {machine}; {args.n} demo JPEGs (96x120) "
        f"resized to {args.input}x{args.input}, backbone.weights=none, batches of "
        f"{cfg.extract.batch_size}; (b) and (a) alternate, {args.rounds} rounds.\n\n"
        "| measure | value |\n| --- | --- |\n"
        f"| (a) bare core: decode + FeatureExtractor + head, one process, no Ray | "
        f"{', '.join(f'{c:.1f}' for c in cores)} img/s |\n"
        f"| (b) `emotr predict`'s job (predict_paths on a 2-CPU Ray), end to end | {pairs('rate')}"
        f" img/s: {', '.join(f'{r:.2f}' for r in rates)} x (a) |\n"
        f"| (b) after the first rows (actor start {pairs('startup')} s) | {pairs('steady')} img/s:"
        f" {', '.join(f'{r:.2f}' for r in steadies)} x (a) |\n"
        f"| (b) resident memory, first / last round | {_memory_text(runs[0]['memory'])} / "
        f"{_memory_text(runs[-1]['memory'])} |\n"
        f"| (b') `emotr predict DIR --output x.parquet`, the command end to end | {command_s:.1f} s"
        f" ({args.n / command_s:.1f} img/s, Python, Ray and actor start-up included) |\n"
        f"| (c) `mlflow models serve`, one-image POST, median / p95 of {args.requests} | "
        f"{median:.0f} / {p95:.0f} ms |\n"
    )
    publish(args, section)


if __name__ == "__main__":
    main()
