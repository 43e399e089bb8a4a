"""Benchmark scaling out: 1, 2 and 4 extractor actors on a multi-node ray.cluster_utils.Cluster.

    python jobs/bench_scaling.py --n 1920 --batch-size 32 --seconds-per-batch 0.8 --actors 1,2,4

The model costs a fixed time per batch (it sleeps, so the host's few cores do not decide the
result) and returns zeros, so the figure is the pipeline's: listing, decode tasks, actor calls and
the driver's commits. Efficiency = steady-state images/s of N actors / (N x that of one actor);
steady state counts from the first features on, after actor start, without each actor's first
batch. Each N extracts the same files into a fresh cache, on a cluster of one node per actor
(each node 2 logical CPUs). Batches of 32 keep Ray's per-batch cost small next to the model's.
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
from benchlib import add_output_arguments, machine_description, publish
from ray.cluster_utils import Cluster

from emotr.config_io import load_config
from emotr.data.demo import generate_demo_dataset
from emotr.data.index import scan_images
from emotr.extract.driver import extract_features
from emotr.extract.weights import feature_dim

REPO_SMOKE = Path(__file__).resolve().parent.parent / "conf" / "smoke.yaml"
# Small object stores: several nodes share this host's memory.
NODE = {"num_cpus": 2, "object_store_memory": 256 * 2**20}


class FixedCostModel:
    """Features of zeros after sleeping a fixed time per batch: an extractor of known cost."""

    def __init__(self, seconds_per_batch: float, dim: int):
        self.seconds, self.dim = seconds_per_batch, dim

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        time.sleep(self.seconds)
        return np.zeros((len(pixels), self.dim), np.float32)


def run_one(args: argparse.Namespace, work: Path, root: Path, n_actors: int) -> tuple[float, ...]:
    """(end-to-end img/s, steady img/s, start seconds) of one extraction with n_actors."""
    cfg = load_config(
        [REPO_SMOKE],
        [
            f"data.root={root}",
            f"cache.root={work / f'cache-{n_actors}'}",
            f"extract.n_actors={n_actors}",
            f"extract.batch_size={args.batch_size}",
            f"extract.decode_batch_size={args.batch_size}",
            f"extract.commit_every={args.batch_size * 4}",
        ],
    )
    cluster = Cluster(initialize_head=True, head_node_args=NODE)
    for _ in range(n_actors - 1):
        cluster.add_node(**NODE)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        seconds, dim = args.seconds_per_batch, feature_dim(cfg.backbone)
        summary = extract_features(
            cfg,
            scan_images(cfg.data, cfg.cache.root),
            progress=False,
            load_model=lambda: FixedCostModel(seconds, dim),
        )
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert summary.n_extracted == args.n and summary.n_actors == n_actors, summary
    # Each actor's first batch was computed before the first features reached the driver (the
    # actors start together): those rows are not counted against the steady-state window.
    n_steady = summary.n_extracted - n_actors * args.batch_size
    steady = n_steady / (summary.wall_seconds - summary.startup_seconds)
    return summary.images_per_second, steady, summary.startup_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1920, help="images")
    parser.add_argument("--seconds-per-batch", type=float, default=0.8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--actors", default="1,2,4")
    add_output_arguments(parser)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as work_dir:
        work = Path(work_dir)
        generate_demo_dataset(work / "data", n=args.n, size=(64, 80), seed=0)
        (work / "data" / "manifest.csv").unlink()  # the folder listing is what is benchmarked
        for n_actors in (int(n) for n in args.actors.split(",")):
            rows.append((n_actors, *run_one(args, work, work / "data", n_actors)))
            print(rows[-1], flush=True)
    base = rows[0][2] / rows[0][0]
    table = "| actors | img/s end to end | img/s steady | start s | efficiency |\n"
    table += "|---|---|---|---|---|\n" + "".join(
        f"| {n} | {e2e:.1f} | {steady:.1f} | {start:.1f} | {steady / (n * base):.2f} |\n"
        for n, e2e, steady, start in rows
    )
    machine = machine_description()
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    command = (
        f"python jobs/bench_scaling.py --n {args.n} --seconds-per-batch "
        f"{args.seconds_per_batch} --batch-size {args.batch_size} --actors {args.actors}"
    )
    rate = args.batch_size / args.seconds_per_batch
    publish(
        args,
        f"\n### Scaling out on a multi-node test cluster, {datetime.date.today().isoformat()}\n\n"
        f"`{command}` on {machine} (load average at the end {load}), Ray {ray.__version__}: "
        "one `ray.cluster_utils.Cluster` node (2 logical CPUs) per actor, a model of fixed "
        f"cost ({args.seconds_per_batch} s per batch of {args.batch_size}, so {rate:.0f} img/s "
        "per actor at best). Steady: from the first features at the driver, each actor's first "
        "batch not counted. Efficiency = steady img/s / (actors x steady img/s of one "
        f"actor).\n\n{table}",
    )


if __name__ == "__main__":
    main()
