"""Benchmark feature taps and cached activations through the Ray pipeline (issue 12).

    python jobs/bench_taps.py --n 200 --size 224x224 --precision bfloat16

On one demo set, in one process: a cold extraction of gap5 alone, then on that warm cache the
same pipeline asked for new taps (gap4, gap3, gmp5 at once), for a mirror-image tap (gap5_flip),
for the block4_pool activation, and for nothing new. Per step: images through the extractor
actors (each image once per step that adds anything, never once per tap), rows written per
output, wall time relative to the cold run, and the activation's bytes per image on disk.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path

import ray
from benchlib import add_output_arguments, publish

from emotr.cache.maintenance import list_caches
from emotr.config_io import load_config
from emotr.data.demo import generate_demo_dataset
from emotr.data.index import scan_images
from emotr.extract.driver import extract_features

STEPS = [
    ("cold: gap5", "[gap5]", None),
    ("+ gap4, gap3, gmp5", "[gap5,gap4,gap3,gmp5]", None),
    ("+ gap5_flip", "[gap5,gap4,gap3,gmp5,gap5_flip]", None),
    ("+ block4_pool activation", "[gap5,gap4,gap3,gmp5,gap5_flip]", "block4_pool"),
    ("nothing new", "[gap5,gap4,gap3,gmp5,gap5_flip]", "block4_pool"),
]


def run_steps(args: argparse.Namespace, work: Path) -> list[dict]:
    data, rows = work / "data", []
    generate_demo_dataset(data, n=args.n, size=(400, 500), seed=1)
    cold = None
    for name, taps, activation in STEPS:
        overrides = [
            f"data.root={data}",
            f"cache.root={work / 'cache'}",
            f"backbone.weights={args.weights}",
            f"backbone.input_size=[{args.size.replace('x', ',')}]",
            f"backbone.precision={args.precision}",
            f"extract.taps={taps}",
            f"extract.cache_activation={activation or 'null'}",
        ]
        cfg = load_config([], overrides)
        before = {info.holds: info.n_rows for info in list_caches(cfg.cache.root)}
        start = time.perf_counter()
        summary = extract_features(cfg, scan_images(cfg.data, cfg.cache.root), progress=False)
        wall = time.perf_counter() - start
        cold = cold or wall
        after = {info.holds: info for info in list_caches(cfg.cache.root)}
        written = {k: v.n_rows - before.get(k, 0) for k, v in after.items()}
        activation_info = after.get("block4_pool")
        rows.append(
            {
                "step": name,
                "images through the actors": sum(summary.rows_per_worker.values()),
                "rows written": ", ".join(f"{k} {n}" for k, n in written.items() if n) or "-",
                "wall s": f"{wall:.1f}",
                "wall / cold": f"{wall / cold:.2f}",
                "activation B/image on disk": (
                    f"{activation_info.n_bytes / activation_info.n_rows:,.0f}"
                    if activation_info and activation_info.n_rows
                    else "-"
                ),
            }
        )
        print(rows[-1], flush=True)
    return rows


def section(args: argparse.Namespace, rows: list[dict], load: tuple[float, ...]) -> str:
    header = list(rows[0])
    lines = [
        f"### Feature taps and cached activations, {datetime.date.today()} "
        f"(`jobs/bench_taps.py --n {args.n} --size {args.size} --precision {args.precision}`)",
        "",
        f"{platform.machine()}, {os.cpu_count()} CPUs, weights {args.weights}; load average "
        f"{load[0]:.1f} before and {os.getloadavg()[0]:.1f} after (other jobs share the machine).",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
        *("| " + " | ".join(str(row[key]) for key in header) + " |" for row in rows),
        "",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="demo images")
    parser.add_argument("--size", default="224x224", help="input size HxW")
    parser.add_argument("--precision", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--weights", default="hed-bsds500", help="backbone.weights")
    add_output_arguments(parser)
    args = parser.parse_args()
    load = os.getloadavg()
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False)
    try:
        with tempfile.TemporaryDirectory(prefix="emotr-bench-taps-") as folder:
            rows = run_steps(args, Path(folder))
    finally:
        ray.shutdown()
    publish(args, section(args, rows, load))


if __name__ == "__main__":
    main()
