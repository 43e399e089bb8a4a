"""Benchmark the deployable model: batch predict images/s, its peak memory, serve latency.

    python jobs/bench_predict.py --n 2000 --input 64

(a) The bare extraction core: decode every image and run emotr's FeatureExtractor and the head,
chunk by chunk, in this process. (b) `emotr predict`'s path: the registered pyfunc model loaded
from the Model Registry and called on chunks of paths (emotr.predict.predict_chunks), with the
process's peak RSS read after a quarter, half and all of the images: flat when the chunks bound
memory. (c) `mlflow models serve --env-manager local`: latency of one-image POSTs (base64 JPEG).
Images are the synthetic demo set; backbone.weights=none (the speed is the same as real weights).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import os
import platform
import resource
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
import requests
from benchlib import add_output_arguments, publish

from emotr.config import HeadParams, load_config
from emotr.demo import generate_demo_dataset
from emotr.head import fit_head
from emotr.imageio import decode_image
from emotr.predict import load_predictor, predict_chunks
from emotr.registry import Candidate, keras_model_bytes, register_model
from emotr.track import Tracker

CHUNK = 64


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    """This process's resident memory now (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def register(work: Path, input_size: int):
    """A registered version: a head fitted on random features, in a SQLite store under work."""
    cfg = load_config(
        [],
        [
            f"mlflow.tracking_uri=sqlite:///{work / 'mlflow.db'}",
            f"mlflow.artifact_location={work / 'artifacts'}",
            "backbone.weights=none",
            f"backbone.input_size=[{input_size},{input_size}]",
            "registry.auto_promote=false",
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
    """(a) images/s of decode -> FeatureExtractor -> head in this process."""
    from emotr.backbone import FeatureExtractor
    from emotr.head import build_head, predict_scores

    extractor = FeatureExtractor(cfg.backbone, batch_size=8)
    head = build_head(HeadParams(), 512)
    size, pixels_cap = tuple(cfg.backbone.input_size), cfg.decode.max_pixels
    started = time.perf_counter()
    for start in range(0, len(paths), CHUNK):
        chunk = paths[start : start + CHUNK]
        pixels = np.stack(
            [decode_image(Path(p).read_bytes(), size, max_pixels=pixels_cap) for p in chunk]
        )
        predict_scores(head, extractor(pixels))
    return len(paths) / (time.perf_counter() - started)


def bench_predict(cfg, tracker, version, paths: list[str]) -> tuple[float, list[float]]:
    """(b) images/s of the registered model on chunks of paths, and RSS at 1/4, 1/2, 1."""
    model = load_predictor(cfg, tracker, f"models:/{version.name}/{version.version}")
    marks = {len(paths) // 4, len(paths) // 2, len(paths)}
    peaks, done = [], 0
    started = time.perf_counter()
    for frame in predict_chunks(model, paths, CHUNK):
        done += len(frame)
        if any(done >= mark > done - len(frame) for mark in marks):
            peaks.append(rss_mib())
    return len(paths) / (time.perf_counter() - started), peaks


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="images")
    parser.add_argument("--input", type=int, default=64, help="backbone input side (pixels)")
    parser.add_argument("--requests", type=int, default=30, help="one-image POSTs to time")
    add_output_arguments(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        generate_demo_dataset(work / "images", n=args.n, size=(96, 120), seed=0)
        paths = sorted(str(p) for p in (work / "images").rglob("*.jpg"))
        cfg, tracker, version = register(work, args.input)
        # Alternated, best of two each: other work on a shared machine hits both alike.
        rates, cores = [], []
        for _ in range(2):
            rate, rss = bench_predict(cfg, tracker, version, paths)
            rates.append(rate)
            cores.append(bench_core(cfg, paths))
            print(f"(b) {rate:.1f} img/s, RSS {rss} MiB; (a) {cores[-1]:.1f} img/s", flush=True)
        rate, core, peak = max(rates), max(cores), peak_rss_mib()
        latencies = bench_serve(tracker, version, Path(paths[0]), args.requests)
    median = statistics.median(latencies) * 1000
    p95 = float(np.percentile(latencies, 95)) * 1000
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    section = (
        f"\n### Deployable model: predict and serve ({datetime.date.today()})\n\n"
        f"`python jobs/bench_predict.py --n {args.n} --input {args.input} --requests "
        f"{args.requests}` on {machine}; {args.n} demo JPEGs (96x120) resized to "
        f"{args.input}x{args.input}, backbone.weights=none, chunks of {CHUNK}; (a) and (b) "
        "alternated twice, best of each.\n\n"
        "| measure | value |\n| --- | --- |\n"
        f"| (a) bare core: decode + FeatureExtractor + head, in process | {core:.1f} img/s |\n"
        f"| (b) `emotr predict` path: registered pyfunc on chunks of paths | {rate:.1f} img/s "
        f"({rate / core:.2f} x core) |\n"
        f"| (b) RSS after 1/4, 1/2, all images (last pass) | "
        f"{', '.join(f'{p:.0f}' for p in rss)} MiB (process peak {peak:.0f} MiB) |\n"
        f"| (c) `mlflow models serve`, one-image POST, median / p95 | {median:.0f} / {p95:.0f} "
        "ms |\n"
    )
    publish(args, section)


if __name__ == "__main__":
    main()
