"""Benchmark feature extraction: bare model vs the tutorial's tf.data loop vs the emotr pipeline.

    python jobs/bench_extract.py --n 400 --sizes 224x224,400x500 --precisions float32,bfloat16

Per input size and precision, images/s of (a) FeatureExtractor on pre-decoded uint8 arrays
(before the pipeline and again after it; pipeline/bare is against their mean),
(b) keras.utils.image_dataset_from_directory streaming into model.predict (the tutorial),
(c) the Ray pipeline from JPEG files to committed Parquet (cold cache, actor start included),
run as `emotr extract` runs it: listed through the listing index, new files hashed on the
workers; plus a warm re-run and 10% new images added to the folder, relative to the cold run.
All numbers of one table come from one process on one machine; compare ratios, not absolute
values across machines.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
from benchlib import add_output_arguments, machine_description, publish

from emotr.cache.store import FeatureCache
from emotr.config_io import load_config
from emotr.data.demo import generate_demo_dataset
from emotr.data.imageio import decode_image
from emotr.data.index import scan_images
from emotr.data.listing import list_images, resolve_classes
from emotr.extract.backbone import FeatureExtractor, build_extractor
from emotr.extract.driver import extract_features
from emotr.extract.fingerprint import compute_fingerprint

COLUMNS = [
    "size",
    "precision",
    "bare img/s",
    "bare img/s after",
    "tutorial img/s",
    "pipeline img/s",
    "pipeline img/s after start",
    "pipeline/bare",
    "warm/cold",
    "+10%/cold",
    "cosine vs float32",
]


def parse_size(text: str) -> tuple[int, int]:
    height, width = (int(part) for part in text.lower().split("x"))
    return height, width


def bench_bare(cfg, paths: list[str], batch_size: int) -> float:
    pixels = np.stack(
        [
            decode_image(
                Path(p).read_bytes(), cfg.backbone.input_size, max_pixels=cfg.decode.max_pixels
            )
            for p in paths
        ]
    )
    model = FeatureExtractor(cfg.backbone, batch_size)
    model(pixels[:batch_size])  # warm-up: graph tracing is not throughput
    start = time.perf_counter()
    for first in range(0, len(pixels), batch_size):
        model(pixels[first : first + batch_size])
    return len(pixels) / (time.perf_counter() - start)


def bench_tutorial(cfg, root: Path, batch_size: int) -> float:
    import keras
    import tensorflow as tf

    model = build_extractor(cfg.backbone)
    model.predict(np.zeros((batch_size, *cfg.backbone.input_size, 3), np.uint8), verbose=0)
    start = time.perf_counter()
    images = keras.utils.image_dataset_from_directory(
        root,
        image_size=cfg.backbone.input_size,
        batch_size=batch_size,
        shuffle=False,
        verbose=False,
    ).map(lambda x, _: tf.cast(x, tf.uint8))
    n = len(model.predict(images, verbose=0))
    return n / (time.perf_counter() - start)


def bench_pipeline(cfg, base, more) -> tuple[float, float, float, float, float]:
    """Cold images/s (end to end, and after the first batch), cold, warm and +10% wall seconds."""
    cold = extract_features(cfg, base, progress=False)
    warm = extract_features(cfg, base, progress=False)
    added = extract_features(cfg, more, progress=False)
    assert warm.n_extracted == 0 and added.n_extracted == len(more.images) - len(base.images)
    steady = cold.n_extracted / (cold.wall_seconds - cold.startup_seconds)
    return (
        cold.n_extracted / cold.wall_seconds,
        steady,
        cold.wall_seconds,
        warm.wall_seconds,
        added.wall_seconds,
    )


def bench_indexed_pipeline(cfg, extra: list[Path]) -> tuple[float, float, float, float, float]:
    """bench_pipeline as `emotr extract` runs: each run lists through the index and new files are
    hashed on the workers; the +10 % are copied into the same folder (and removed after)."""

    def scan_and_extract():
        start = time.perf_counter()
        summary = extract_features(cfg, scan_images(cfg.data, cfg.cache.root), progress=False)
        return summary, time.perf_counter() - start  # the listing counts

    root = Path(cfg.data.root)
    cold, cold_s = scan_and_extract()
    warm, warm_s = scan_and_extract()
    copies = [root / path.parent.name / f"added_{i:05d}.jpg" for i, path in enumerate(extra)]
    try:
        for source, copy in zip(extra, copies, strict=True):
            shutil.copy(source, copy)
        added, added_s = scan_and_extract()
    finally:
        for copy in copies:
            copy.unlink(missing_ok=True)
    assert warm.n_extracted == 0 and added.n_extracted == len(extra)
    steady = cold.n_extracted / (cold.wall_seconds - cold.startup_seconds)
    return cold.n_extracted / cold_s, steady, cold_s, warm_s, added_s


def cached_features(cfg, listing) -> np.ndarray:
    fingerprint, _ = compute_fingerprint(cfg.backbone, cfg.decode)
    return FeatureCache.open(cfg.cache.root, fingerprint).load(listing.images["sha256"].tolist())


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    dots = (a * b).sum(axis=1)
    return float(np.mean(dots / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def make_data(folder: Path, n: int, image_size: tuple[int, int]) -> tuple[Path, Path]:
    base, more = folder / "base", folder / "more"
    generate_demo_dataset(base, n=n, size=image_size, seed=0)
    extra = generate_demo_dataset(folder / "extra", n=max(1, n // 10), size=image_size, seed=1)
    shutil.copytree(base, more)
    for index, path in enumerate(sorted(extra.manifest.parent.rglob("*.jpg"))):
        shutil.copy(path, more / path.parent.name / f"extra_{index:05d}.jpg")
    for root in (base, more):
        (root / "manifest.csv").unlink()  # the folder listing is what is benchmarked
    return base, more


def run(args: argparse.Namespace, work: Path) -> list[list[str]]:
    base_root, more_root = make_data(work, args.n, parse_size(args.image_size))
    rows = []
    for size in args.sizes.split(","):
        reference = None  # float32 features of this size, to measure what bfloat16 changes
        for precision in args.precisions.split(","):
            height, width = parse_size(size)
            overrides = [
                f"backbone.input_size=[{height},{width}]",
                f"backbone.precision={precision}",
                f"backbone.weights={args.weights}",
                f"extract.batch_size={args.batch_size}",
                f"cache.root={work / f'cache-{size}-{precision}'}",
            ]
            cfg = load_config([], [*overrides, f"data.root={base_root}"])
            cfg = cfg.model_copy(update={"data": resolve_classes(cfg.data)})
            base = list_images(cfg.data)
            bare = bench_bare(cfg, base.images["path"].tolist(), args.batch_size)
            tutorial = bench_tutorial(cfg, base_root, args.batch_size)
            extra = sorted(more_root.rglob("extra_*.jpg"))
            pipeline, steady, cold, warm, added = bench_indexed_pipeline(cfg, extra)
            # The bare model again: a shared machine's pace drifts over the minutes the pipeline
            # runs, and the ratio is taken against the mean of the two.
            bare_after = bench_bare(cfg, base.images["path"].tolist(), args.batch_size)
            features = cached_features(cfg, base)
            reference = features if precision == "float32" else reference
            cosine = "-" if reference is None else f"{mean_cosine(features, reference):.5f}"
            rows.append(
                [
                    size,
                    precision,
                    f"{bare:.1f}",
                    f"{bare_after:.1f}",
                    f"{tutorial:.1f}",
                    f"{pipeline:.1f}",
                    f"{steady:.1f}",
                    f"{2 * pipeline / (bare + bare_after):.3f}",
                    f"{warm / cold:.3f}",
                    f"{added / cold:.2f}",
                    cosine,
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
    return rows


def markdown(args: argparse.Namespace, rows: list[list[str]]) -> str:
    header = f"| {' | '.join(COLUMNS)} |\n|{'---|' * len(COLUMNS)}\n"
    body = "".join(f"| {' | '.join(row)} |\n" for row in rows)
    machine = machine_description()
    # Other jobs on a shared machine change every rate: the section says how busy it was.
    machine += f" (load average at the end {', '.join(f'{v:.1f}' for v in os.getloadavg())})"
    return (
        f"\n### Extraction, {datetime.date.today().isoformat()}\n\n"
        f"`python jobs/bench_extract.py --n {args.n} --sizes {args.sizes} --precisions "
        f"{args.precisions} --image-size {args.image_size} --weights {args.weights} "
        f"--batch-size {args.batch_size}` on {machine}, Ray {ray.__version__}, "
        f"GPUs: {int(ray.cluster_resources().get('GPU', 0))}. Pipeline img/s includes actor start "
        "and model load; warm/cold and +10%/cold are wall-time ratios, listing included (the "
        f"listing index; new files hashed on the workers).\n\n{header}{body}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40, help="images in the cold set")
    parser.add_argument("--sizes", default="64x64", help="model input sizes, e.g. 224x224,400x500")
    parser.add_argument("--precisions", default="float32", help="float32,bfloat16")
    parser.add_argument("--image-size", default="400x500", help="HxW of the JPEG files")
    parser.add_argument("--weights", default="none", help="backbone.weights (none: no download)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-cpus", type=int, default=None, help="local Ray CPUs")
    add_output_arguments(parser)
    args = parser.parse_args()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as work:
        rows = run(args, Path(work))
    section = markdown(args, rows)
    publish(args, section)


if __name__ == "__main__":
    main()
