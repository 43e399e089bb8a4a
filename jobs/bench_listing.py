"""Benchmark listing with the index, and a warm `emotr extract` that has nothing to do.

    python jobs/bench_listing.py --n-listing 100000 --n-extract 100000 --extract-kb 40 \\
        --before f0fc25c^ --repeats 3 --n-s3 10000

(1) Listing N small local files (with --n-s3, also objects on moto's S3 server on 127.0.0.1):
today's way (`data.list_images`: the driver reads and hashes every file), then with the listing
index: cold (no index: every file hashed), warm (nothing new) and +1 % new files.
(2) `emotr extract` in a fresh process over M unchanged files (--extract-kb each) whose
features are cached and whose index is written: what a warm re-run costs end to end.
The features are placeholders committed straight to the cache: the warm path reads none.
--before REV also times that warm run with the code of commit REV (a `git archive` of it), in
the same run, on the same files, cache and MLflow store, taking turns with today's code; the
first run of each (which writes bytecode, and for the old code the MLflow store) is not timed.
Issue 9's target: now / before < 0.05 at 100,000 files.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import yaml
from benchlib import REPO, add_output_arguments, machine_description, publish

from emotr.cache.store import FeatureCache
from emotr.config_io import load_config
from emotr.data.index import list_images_indexed
from emotr.data.listing import list_images
from emotr.extract.fingerprint import compute_fingerprint
from emotr.extract.weights import feature_dim


def write_files(root: Path, start: int, stop: int, n_bytes: int = 0) -> None:
    """Distinct files under root/{negative,positive}/ (listing never decodes them).

    n_bytes 0: about 1.2 KB each; otherwise that size (a 224x224 JPEG is ~10-20 KB, a photo
    at the tutorial's 400x500 ~30-60 KB): what today's driver-side hashing reads.
    """
    for index in range(start, stop):
        folder = root / ("negative", "positive")[index % 2]
        folder.mkdir(parents=True, exist_ok=True)
        content = f"emotr-bench-{index}".encode() * 64
        if n_bytes:
            content = (content * (n_bytes // len(content) + 1))[:n_bytes]
        (folder / f"image_{index:07d}.jpg").write_bytes(content)


def timed(action) -> tuple[float, object]:
    start = time.perf_counter()
    result = action()
    return time.perf_counter() - start, result


def bench_listing(
    root: str, cache: str, write: Callable[[int, int], None], n: int, where: str
) -> list[list[str]]:
    """Seconds of today's listing and of the indexed one cold, warm and after +1 % files."""
    write(0, n)
    cfg = load_config([], [f"data.root={root}"]).data
    today, _ = timed(lambda: list_images(cfg))
    cold, _ = timed(lambda: list_images_indexed(cfg, cache))
    warm, _ = timed(lambda: list_images_indexed(cfg, cache))
    write(n, n + n // 100)
    added, _ = timed(lambda: list_images_indexed(cfg, cache))
    rows = [("today (no index)", today), ("cold", cold), ("warm", warm), ("+1 %", added)]
    return [[f"{n:,} {where}", name, f"{s:.2f}", f"{s / today:.3f}"] for name, s in rows]


@contextlib.contextmanager
def moto_bucket() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (AWS_* set in this process); yields a new bucket's URI."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
        AWS_EC2_METADATA_DISABLED="true",
    )
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        admin = pafs.S3FileSystem(
            endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True
        )
        admin.create_dir("bench")
        yield "s3://bench"
    finally:
        server.terminate()
        server.wait(timeout=30)


def object_writer(prefix: str) -> Callable[[int, int], None]:
    """Writes small distinct objects start..stop-1 under prefix/{negative,positive}/."""
    filesystem, base = pafs.FileSystem.from_uri(prefix)

    def put(index: int) -> None:
        name = f"{base}/{('negative', 'positive')[index % 2]}/image_{index:07d}.jpg"
        with filesystem.open_output_stream(name) as stream:
            stream.write(f"emotr-bench-{index}".encode() * 64)

    def write(start: int, stop: int) -> None:
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(put, range(start, stop)))

    return write


def time_extract(command: list[str], cwd: Path, n_cached: int) -> float:
    """Wall seconds of one `emotr extract` run in `cwd` that finds all n_cached cached."""
    # Bytecode is written and reused, as in any install (an environment may forbid writing it:
    # each run would then compile every emotr module again). An untimed first run writes it.
    ignored = {"RAY_ADDRESS", "PYTHONDONTWRITEBYTECODE"}
    env = {k: v for k, v in os.environ.items() if k not in ignored}
    env["PYTHONPATH"] = str(cwd)  # this tree's emotr, whatever the venv installed
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    said = " ".join(done.stdout.split())  # the console wraps long lines
    assert done.returncode == 0 and f"0 extracted, {n_cached} already" in said, (
        done.stdout + done.stderr
    )[-2000:]
    return seconds


def overrides_as_yaml(overrides: list[str]) -> dict:
    """{"a": {"b": value}} for overrides ["a.b=value"]."""
    tree: dict = {}
    for item in overrides:
        key, value = item.split("=", 1)
        section, name = key.split(".")
        tree.setdefault(section, {})[name] = value
    return tree


def checkout(rev: str, folder: Path) -> Path:
    """The files of commit `rev` in `folder` (git archive: the repository is not touched)."""
    folder.mkdir()
    archive = subprocess.run(["git", "archive", rev], cwd=REPO, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def bench_warm_extract(
    work: Path, n: int, n_bytes: int, repeats: int, before: str | None
) -> tuple[list[float], list[float]]:
    """Warm `emotr extract` seconds now, and with the code of commit `before` (or none)."""
    root = work / "extract"
    write_files(root, 0, n, n_bytes)
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
    # A re-run meets files written long ago: without this, the kernel is still writing back
    # the gigabytes just written while the runs are timed.
    os.sync()
    config = work / "extract.yaml"
    # Only these keys: the code of another commit may not know every key of today's config.
    config.write_text(yaml.safe_dump(overrides_as_yaml(overrides)))
    command = [sys.executable, "-m", "emotr.cli", "extract", "-c", str(config)]
    trees = [REPO] if before is None else [REPO, checkout(before, work / "before")]
    # The first run of each warms the page cache and writes bytecode; the old code's also
    # creates the MLflow store. Then the trees take turns: a shared machine's pace drifts over
    # minutes, and both see the same drift.
    for tree in trees:
        time_extract(command, tree, len(hashes))
    runs = [[time_extract(command, tree, len(hashes)) for tree in trees] for _ in range(repeats)]
    now = [pair[0] for pair in runs]
    return now, [pair[1] for pair in runs] if before is not None else []


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as `uptime` shows them."""
    return ", ".join(f"{value:.1f}" for value in os.getloadavg())


def extract_text(
    args: argparse.Namespace, extract: list[float], old: list[float], load: str
) -> str:
    """The warm extract's paragraph: runs now, before, the ratio against issue 9's 5 %."""
    size = f"{args.extract_kb:g} KB" if args.extract_kb else "1.2 KB"
    runs = ", ".join(f"{s:.2f}" for s in extract)
    text = (
        f"Warm `emotr extract` (a fresh process, nothing to extract: no MLflow run) over "
        f"{args.n_extract:,} unchanged local files of {size} (load average before the runs "
        f"{load}): {runs} s (median {np.median(extract):.2f} s); neither Ray, TensorFlow nor "
        "MLflow started."
    )
    if not old:
        return text + "\n"
    ratio = np.median(extract) / np.median(old)
    verdict = "met" if ratio < 0.05 else "not met"
    return text + (
        f" With the code of {args.before} (driver hashes every file, then starts Ray and "
        f"TensorFlow; runs taking turns with today's, first run of each not timed): "
        f"{', '.join(f'{s:.2f}' for s in old)} s; "
        f"**now / before {ratio:.3f}** (target < 0.05 at 100,000 files: {verdict}).\n"
    )


def markdown(
    args: argparse.Namespace,
    listing: list[list[str]],
    extract: tuple[list[float], list[float], str],
) -> str:
    machine = machine_description()
    table = "| files | listing | seconds | / today |\n|---|---|---|---|\n"
    table += "".join(f"| {' | '.join(row)} |\n" for row in listing)
    option = f" --before {args.before}" if args.before else ""
    command = (
        f"python jobs/bench_listing.py --n-listing {args.n_listing} --n-extract "
        f"{args.n_extract} --extract-kb {args.extract_kb:g} --repeats {args.repeats}{option} "
        f"--n-s3 {args.n_s3} --file-kb {','.join(f'{kb:g}' for kb in args.file_kb)}"
    )
    return (
        f"\n### Listing index and a warm extract, {datetime.date.today().isoformat()}\n\n"
        f"`{command}` on {machine} (load average at the end {load_average()}). Small files; "
        "today = `data.list_images`, the driver hashing every file; cold/warm/+1 % = "
        "`listing.list_images_indexed` (hashes of new files on the driver here; `emotr "
        f"extract` hashes them on its workers).\n\n{table}\n{extract_text(args, *extract)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-listing", type=int, default=100_000, help="files to list")
    parser.add_argument("--n-extract", type=int, default=20_000, help="files of the warm extract")
    parser.add_argument(
        "--extract-kb", type=float, default=0.0, help="size of the warm extract's files (0: 1.2)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="warm extract runs timed")
    parser.add_argument("--before", help="also time the warm extract at this commit")
    parser.add_argument("--n-s3", type=int, default=0, help="objects to list on moto's S3")
    parser.add_argument(
        "--file-kb",
        type=lambda text: [float(kb) for kb in text.split(",")],
        default=[0.0],
        help="sizes of the local listing's files in KB, comma-separated (0: ~1.2 KB)",
    )
    add_output_arguments(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-listing-") as work:
        listing = []
        for kb in args.file_kb:
            local = Path(work) / f"listing-{kb}"
            write = functools.partial(write_files, local, n_bytes=int(kb * 1024))
            where = f"local, {kb:g} KB files" if kb else "local, 1.2 KB files"
            cache = f"{work}/listing-cache-{kb}"
            listing += bench_listing(str(local), cache, write, args.n_listing, where)
            shutil.rmtree(local)
        if args.n_s3:
            with moto_bucket() as bucket:
                where = "S3 (moto)"
                writer = object_writer(f"{bucket}/data")
                listing += bench_listing(
                    f"{bucket}/data", f"{bucket}/cache", writer, args.n_s3, where
                )
        load = load_average()
        n_bytes = int(args.extract_kb * 1024)
        extract, old = bench_warm_extract(
            Path(work), args.n_extract, n_bytes, args.repeats, args.before
        )
    publish(args, markdown(args, listing, (extract, old, load)))


if __name__ == "__main__":
    main()
