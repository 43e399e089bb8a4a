"""Benchmark listing with the index, and a warm `emotr extract` that has nothing to do.

    python jobs/bench_listing.py --n-listing 100000 --n-extract 20000

(1) Listing N small local files: today's way (`data.list_images`: the driver reads and hashes
every file), then with the listing index: cold (no index: every file hashed), warm (nothing new)
and +1 % new files. (2) `emotr extract` in a fresh process over M unchanged files whose features
are cached and whose index is written: what a warm re-run costs end to end, MLflow run included.
The features are placeholders committed straight to the cache: the warm path reads none.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from benchlib import REPO, add_output_arguments, publish

from emotr.backbone import feature_dim
from emotr.cache import FeatureCache, compute_fingerprint
from emotr.config import load_config, to_yaml
from emotr.data import list_images
from emotr.listing import list_images_indexed


def write_files(root: Path, start: int, stop: int) -> None:
    """Small distinct files under root/{negative,positive}/ (listing never decodes them)."""
    for index in range(start, stop):
        folder = root / ("negative", "positive")[index % 2]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"image_{index:07d}.jpg").write_bytes(f"emotr-bench-{index}".encode() * 64)


def timed(action) -> tuple[float, object]:
    start = time.perf_counter()
    result = action()
    return time.perf_counter() - start, result


def bench_listing(work: Path, n: int) -> list[list[str]]:
    root, cache = work / "listing", str(work / "listing-cache")
    write_files(root, 0, n)
    cfg = load_config([], [f"data.root={root}"]).data
    today, _ = timed(lambda: list_images(cfg))
    cold, _ = timed(lambda: list_images_indexed(cfg, cache))
    warm, _ = timed(lambda: list_images_indexed(cfg, cache))
    write_files(root, n, n + n // 100)
    added, _ = timed(lambda: list_images_indexed(cfg, cache))
    rows = [("today (no index)", today), ("cold", cold), ("warm", warm), ("+1 %", added)]
    return [[f"{n:,} local", name, f"{s:.2f}", f"{s / today:.3f}"] for name, s in rows]


def bench_warm_extract(work: Path, n: int, repeats: int) -> list[float]:
    root = work / "extract"
    write_files(root, 0, n)
    overrides = [
        f"data.root={root}",
        f"cache.root={work / 'extract-cache'}",
        f"mlflow.tracking_uri=sqlite:///{work / 'mlflow.db'}",
        f"mlflow.artifact_location={work / 'mlartifacts'}",
        "backbone.weights=none",
    ]
    cfg = load_config([], overrides)
    listing = list_images_indexed(cfg.data, cfg.cache.root)  # writes the index
    fingerprint, inputs = compute_fingerprint(cfg.backbone, cfg.decode)
    hashes = sorted(set(listing.images["sha256"]))
    features = np.ones((len(hashes), feature_dim(cfg.backbone)), np.float32)
    FeatureCache(cfg.cache.root, fingerprint, inputs).commit(
        hashes, features, [1] * len(hashes), [1] * len(hashes)
    )
    config = work / "extract.yaml"
    config.write_text(to_yaml(cfg))
    command = [sys.executable, "-m", "emotr.cli", "extract", "-c", str(config)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    seconds = []
    for _ in range(repeats + 1):  # the first run creates the MLflow store: not a warm run
        start = time.perf_counter()
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        seconds.append(time.perf_counter() - start)
        said = " ".join(done.stdout.split())  # the console wraps long lines
        assert done.returncode == 0 and f"0 extracted, {len(hashes)} already" in said, (
            done.stdout + done.stderr
        )[-2000:]
    return seconds[1:]


def markdown(args: argparse.Namespace, listing: list[list[str]], extract: list[float]) -> str:
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    table = "| files | listing | seconds | / today |\n|---|---|---|---|\n"
    table += "".join(f"| {' | '.join(row)} |\n" for row in listing)
    runs = ", ".join(f"{s:.2f}" for s in extract)
    return (
        f"\n### Listing index and a warm extract, {datetime.date.today().isoformat()}\n\n"
        f"`python jobs/bench_listing.py --n-listing {args.n_listing} --n-extract "
        f"{args.n_extract} --repeats {args.repeats}` on {machine} (load average at the end "
        f"{load}). Small local files; today = `data.list_images`, the driver hashing every "
        f"file; cold/warm/+1 % = `listing.list_images_indexed` (hashes of new files on the "
        f"driver here; `emotr extract` hashes them on its workers).\n\n{table}\n"
        f"Warm `emotr extract` (a fresh process, nothing to extract, MLflow run on SQLite) over "
        f"{args.n_extract:,} unchanged files: {runs} s (median {np.median(extract):.2f} s); "
        f"neither Ray nor TensorFlow started.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-listing", type=int, default=100_000, help="files to list")
    parser.add_argument("--n-extract", type=int, default=20_000, help="files of the warm extract")
    parser.add_argument("--repeats", type=int, default=3, help="warm extract runs timed")
    add_output_arguments(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-listing-") as work:
        listing = bench_listing(Path(work), args.n_listing)
        extract = bench_warm_extract(Path(work), args.n_extract, args.repeats)
    publish(args, markdown(args, listing, extract))


if __name__ == "__main__":
    main()
