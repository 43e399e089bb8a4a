"""Benchmark the extraction core without Ray, on any Keras backend (e.g. the GPU machine on JAX).

    KERAS_BACKEND=jax python jobs/bench_core.py --size 400x500 --precisions float32,bfloat16

Images/s of
  decode: emotr.data.imageio.decode_image (Pillow) in one process per CPU, JPEG bytes -> uint8
  pixels
          (what the decode tasks of the Ray pipeline do; the pixels stay in the worker, since
          piping them back would measure the pipe: Ray hands them over in shared memory);
  keras:  a plain Keras loop, model.predict_on_batch on host uint8 batches;
  core:   emotr's FeatureExtractor on host uint8 batches (what every extractor actor runs);
  roof:   (JAX) the same jitted model on pixels already on the device: no host copies at all.
The weights do not change the speed; the default `none` needs no download.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from benchlib import add_output_arguments, machine_description, publish

from emotr.config import BackboneConfig, DecodeConfig


def _generate(args: tuple[Path, int, tuple[int, int], int]) -> list[Path]:
    from emotr.data.demo import generate_demo_dataset

    folder, n, size, seed = args
    generate_demo_dataset(folder, n=n, size=size, seed=seed)
    return sorted(folder.rglob("*.jpg"))


def _decode_chunk(args: tuple[list[bytes], tuple[int, int], int]) -> int:
    from emotr.data.imageio import decode_image

    blobs, size, max_pixels = args
    return sum(int(decode_image(blob, size, max_pixels=max_pixels)[0, 0, 0]) for blob in blobs)


def make_jpegs(folder: Path, n: int, size: tuple[int, int], pool: ProcessPoolExecutor) -> list:
    """n demo JPEGs of `size`, generated in parallel; returns their bytes."""
    per_worker = max(1, n // (os.cpu_count() or 1))
    jobs = [(folder / f"part{i}", per_worker, size, i) for i in range(max(1, n // per_worker))]
    return [path.read_bytes() for paths in pool.map(_generate, jobs) for path in paths]


def bench_decode(blobs: list[bytes], size, n: int, pool: ProcessPoolExecutor) -> float:
    """Images/s of decoding n JPEGs in the pool."""
    chunk = 32
    repeated = [blobs[i % len(blobs)] for i in range(n)]
    jobs = [(repeated[i : i + chunk], size, DecodeConfig().max_pixels) for i in range(0, n, chunk)]
    list(pool.map(_decode_chunk, jobs[: pool._max_workers]))  # warm the workers' imports
    start = time.perf_counter()
    list(pool.map(_decode_chunk, jobs))
    return n / (time.perf_counter() - start)


def decoded_pixels(blobs: list[bytes], size, n: int) -> np.ndarray:
    """n uint8 images for the model benches: the distinct files decoded once, then repeated."""
    from emotr.data.imageio import decode_image

    max_pixels = DecodeConfig().max_pixels
    distinct = np.stack([decode_image(blob, size, max_pixels=max_pixels) for blob in blobs])
    return distinct[np.arange(n) % len(distinct)]


def timed(run, n_images: int, repeats: int = 3) -> float:
    """Best images/s over `repeats` runs after one warm-up (compilation is not throughput)."""
    run()
    best = min(_seconds(run) for _ in range(repeats))
    return n_images / best


def _seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def bench_models(cfg: BackboneConfig, pixels: np.ndarray, batch_sizes: list[int]) -> dict:
    import keras

    from emotr.extract.backbone import FeatureExtractor

    results = {}
    for batch_size in batch_sizes:
        extractor = FeatureExtractor(cfg, batch_size)
        n = len(pixels) - len(pixels) % batch_size
        results[f"core b{batch_size}"] = timed(lambda e=extractor, n=n: e(pixels[:n]), n)
        if batch_size == batch_sizes[len(batch_sizes) // 2]:
            model = extractor.model

            def keras_loop(n=n, b=batch_size, model=model):
                for start in range(0, n, b):
                    np.asarray(model.predict_on_batch(pixels[start : start + b]))

            results[f"keras b{batch_size}"] = timed(keras_loop, n)
            # The fast path must compute what Keras computes.
            difference = np.abs(
                extractor(pixels[:batch_size]) - model.predict_on_batch(pixels[:batch_size])
            )
            print(f"core vs keras: max |difference| {difference.max():.2e}", flush=True)
            if keras.backend.backend() == "jax":
                results[f"roof b{batch_size}"] = _bench_roof(extractor, pixels[:batch_size], n)
        del extractor
    return results


def _bench_roof(extractor, batch: np.ndarray, n: int) -> float:
    import jax

    on_device = jax.device_put(batch)

    def run():
        outputs = [extractor._forward(on_device) for _ in range(n // len(batch))]
        jax.block_until_ready(outputs)

    return timed(run, n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="400x500", help="model input and JPEG size, HxW")
    parser.add_argument("--precisions", default="float32,bfloat16")
    parser.add_argument("--batch-sizes", default="64,128,256")
    parser.add_argument("--n", type=int, default=2048, help="images per timed run")
    parser.add_argument("--n-files", type=int, default=256, help="distinct JPEGs to decode")
    parser.add_argument("--weights", default="none")
    add_output_arguments(parser)
    args = parser.parse_args()
    size = tuple(int(part) for part in args.size.lower().split("x"))
    batch_sizes = [int(part) for part in args.batch_sizes.split(",")]
    # spawn: the pool must not inherit a half-initialised accelerator runtime.
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as work, ProcessPoolExecutor(mp_context=context) as pool:
        blobs = make_jpegs(Path(work), args.n_files, size, pool)
        decode_rate = bench_decode(blobs, size, args.n, pool)
    pixels = decoded_pixels(blobs, size, args.n)
    print(f"decode: {decode_rate:.0f} img/s on {os.cpu_count()} processes", flush=True)

    import keras

    rows = []
    for precision in args.precisions.split(","):
        cfg = BackboneConfig(weights=args.weights, input_size=size, precision=precision)
        for name, rate in bench_models(cfg, pixels, batch_sizes).items():
            rows.append((precision, name, rate))
            print(f"{precision} {name}: {rate:.0f} img/s", flush=True)
    section = markdown(args, keras.backend.backend(), decode_rate, rows)
    publish(args, section)


def accelerator(backend: str) -> str:
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        return f"{device.platform}: {device.device_kind}"
    if backend == "torch":
        import torch

        return f"torch {torch.__version__}: " + (
            torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        )
    import tensorflow as tf

    return "tensorflow: " + ", ".join(d.name for d in tf.config.list_physical_devices())


def markdown(args, backend: str, decode_rate: float, rows: list[tuple[str, str, float]]) -> str:
    machine = machine_description()
    body = "".join(f"| {precision} | {name} | {rate:.0f} |\n" for precision, name, rate in rows)
    return (
        f"\n### Extraction core, {datetime.date.today().isoformat()}\n\n"
        f"`KERAS_BACKEND={backend} python jobs/bench_core.py --size {args.size} --precisions "
        f"{args.precisions} --batch-sizes {args.batch_sizes} --n {args.n}` on {machine}, "
        f"{accelerator(backend)}. Pillow decode on all CPUs: {decode_rate:.0f} img/s.\n\n"
        f"| precision | path | img/s |\n|---|---|---|\n{body}"
    )


if __name__ == "__main__":
    main()
