"""Benchmark the Ray pipeline against the bare core, without TensorFlow: for GPU machines on JAX.

    KERAS_BACKEND=jax python jobs/bench_pipeline.py --n 4096 --size 400x500 --keras-backend jax

In one process: (a) FeatureExtractor on pre-decoded uint8 arrays, (c) the Ray pipeline from JPEG
files to committed Parquet (cold cache, actor start included), then a warm re-run and +10 % files.
bench_extract.py does the same plus the tutorial's TensorFlow loader. The files are copies of
--n-faces generated demo faces, each copy with its own trailing bytes (ignored by JPEG decoders),
so that the content-addressed cache sees n distinct images; generating n faces would take minutes.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import ray
from bench_core import make_jpegs
from bench_extract import bench_bare, bench_pipeline
from benchlib import add_output_arguments, machine_description, publish

from emotr.config_io import load_config
from emotr.data.listing import list_images


def write_copies(blobs: list[bytes], root: Path, start: int, stop: int) -> None:
    """Files start..stop-1 under root/{negative,positive}/, each with distinct bytes."""
    for index in range(start, stop):
        folder = root / ("negative", "positive")[index % 2]
        folder.mkdir(parents=True, exist_ok=True)
        data = blobs[index % len(blobs)] + f"emotr-bench-copy-{index}".encode()
        (folder / f"image_{index:06d}.jpg").write_bytes(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096, help="images in the cold set")
    parser.add_argument("--n-faces", type=int, default=512, help="distinct generated faces")
    parser.add_argument("--size", default="400x500", help="model input and JPEG size, HxW")
    parser.add_argument("--precision", default="bfloat16")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--decode-batch-size", type=int, default=16)
    parser.add_argument("--keras-backend", default="jax")
    parser.add_argument("--weights", default="none")
    add_output_arguments(parser)
    args = parser.parse_args()
    height, width = (int(part) for part in args.size.lower().split("x"))
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as work_dir:
        work = Path(work_dir)
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(mp_context=spawn) as pool:
            blobs = make_jpegs(work / "faces", args.n_faces, (height, width), pool)
        base, more = work / "base", work / "more"
        write_copies(blobs, base, 0, args.n)
        write_copies(blobs, more, 0, args.n + args.n // 10)
        overrides = [
            f"backbone.input_size=[{height},{width}]",
            f"backbone.precision={args.precision}",
            f"backbone.weights={args.weights}",
            f"extract.batch_size={args.batch_size}",
            f"extract.decode_batch_size={args.decode_batch_size}",
            f"extract.keras_backend={args.keras_backend}",
            f"cache.root={work / 'cache'}",
        ]
        cfg = load_config([], [*overrides, f"data.root={base}"])
        base_listing = list_images(cfg.data)
        more_listing = list_images(load_config([], [*overrides, f"data.root={more}"]).data)
        ray.init(include_dashboard=False, log_to_driver=False)
        bare = bench_bare(cfg, base_listing.images["path"].tolist(), args.batch_size)
        print(f"bare: {bare:.0f} img/s", flush=True)
        cold, steady, cold_s, warm_s, added_s = bench_pipeline(cfg, base_listing, more_listing)
        gpus = int(ray.cluster_resources().get("GPU", 0))
    row = (
        f"| {args.size} | {args.precision} | {args.keras_backend} | {bare:.0f} | {cold:.0f} | "
        f"{steady:.0f} | {cold / bare:.2f} | {cold_s:.1f} | {warm_s / cold_s:.4f} | "
        f"{added_s / cold_s:.2f} |\n"
    )
    machine = f"{machine_description()}, GPUs: {gpus}"
    section = (
        f"\n### Pipeline vs bare core, {datetime.date.today().isoformat()}\n\n"
        f"`python jobs/bench_pipeline.py --n {args.n} --size {args.size} --precision "
        f"{args.precision} --batch-size {args.batch_size} --decode-batch-size "
        f"{args.decode_batch_size} --keras-backend {args.keras_backend}` "
        f"on {machine}, Ray {ray.__version__}.\n\n"
        "| size | precision | backend | bare img/s | pipeline img/s | after start img/s | "
        "pipeline/bare | cold s | warm/cold | +10%/cold |\n"
        f"|{'---|' * 10}\n"
        f"{row}"
    )
    publish(args, section)


if __name__ == "__main__":
    main()
