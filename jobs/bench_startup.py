"""Start-up timeline of an extraction: where the seconds before the first features go.

    python jobs/bench_startup.py --n 163 --size 224x224 --precision bfloat16 --weights hed-bsds500
    KERAS_BACKEND=jax python jobs/bench_startup.py --n 512 --size 400x500 --batch-size 128 \
        --keras-backend jax   # a GPU node

Starts a local Ray as `emotr extract` does, then extracts two folders of N new images: the first
run meets a Ray that has just started (Ray Data's own actors start with it), the second is a
re-run in the same Ray, as the +10 % run of jobs/bench_extract.py is. Each event is timed from
the run's start (listing included). The actor's events come from an instrumented subclass of
emotr.extract.actor.Extractor (the same code, with timestamps written to a file); its model-load
steps are the Extractor's own `load_phases` (Keras import, the device runtime's start: CUDA on a
GPU, the model build with its weights, and on GPU plans the first compile). On JAX the compilation
cache is a new folder: the first run compiles without it, the re-run with it warm.
Numbers of one table come from one process on one machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time
from pathlib import Path

import ray
from benchlib import add_output_arguments, machine_description, publish

from emotr.config_io import load_config
from emotr.data.demo import generate_demo_dataset
from emotr.data.index import scan_images
from emotr.extract import dataset as extract_dataset
from emotr.extract import driver as extract
from emotr.extract.actor import Extractor


class TimedExtractor(Extractor):
    """The Extractor, writing when its process started and when each step ended to `events`."""

    events = ""  # set before the dataset is built; pickled with this class (a __main__ class)

    def __init__(self, *args, **kwargs):
        import psutil

        self._mark("actor process started", psutil.Process().create_time())
        self._mark("actor constructor entered")
        super().__init__(*args, **kwargs)
        self._mark("actor constructor returned (model loads in the background)")
        self._n_calls = 0

    def _load(self, *args) -> None:
        start = time.time()
        super()._load(*args)
        for name, seconds in self.load_phases.items():
            start += seconds
            self._mark(f"model load: {name} done", start)

    def __call__(self, batch):
        first = self._n_calls == 0
        if first:
            self._mark(f"first call entered ({len(batch['ok'])} images decoded)")
        result = super().__call__(batch)
        if first:
            self._mark("first call done (includes tracing)")
        self._n_calls += 1
        return result

    def _mark(self, what: str, at: float | None = None) -> None:
        with open(self.events, "a") as file:
            file.write(json.dumps({"what": what, "at": time.time() if at is None else at}) + "\n")


def _timed_build_dataset(*args, **kwargs):
    dataset = _build_dataset(*args, **kwargs)
    TimedExtractor._mark(TimedExtractor, "driver: dataset built (execution starts)")
    return dataset


_build_dataset = extract_dataset.build_dataset


def timed_run(cfg, events: Path) -> list[tuple[str, float]]:
    """(event, seconds since the run's start) of one listing + extraction of new images."""
    events.write_text("")
    start = time.time()
    scan = scan_images(cfg.data, cfg.cache.root)
    listed = time.time()
    summary = extract.extract_features(cfg, scan, progress=False)
    end = time.time()
    assert summary.n_extracted == summary.n_images, summary
    actor = [json.loads(line) for line in events.read_text().splitlines()]
    timeline = [
        ("driver: listing done", listed),
        ("driver: first features arrived", start + summary.startup_seconds),
        (f"driver: all {summary.n_extracted} committed", end),
        *((event["what"], event["at"]) for event in actor),
    ]
    return sorted(((what, at - start) for what, at in timeline), key=lambda item: item[1])


def run(args: argparse.Namespace, work: Path) -> tuple[list, list]:
    height, width = (int(part) for part in args.image_size.split("x"))
    size_h, size_w = (int(part) for part in args.size.split("x"))
    TimedExtractor.events = str(work / "events.jsonl")
    # Instrumentation: extract_features and build_dataset look both names up when they run.
    extract_dataset.Extractor, extract.build_dataset = TimedExtractor, _timed_build_dataset
    runs = []
    for seed in (1, 2):
        root = work / f"data-{seed}"
        generate_demo_dataset(root, n=args.n, size=(height, width), seed=seed)
        (root / "manifest.csv").unlink()  # the folder listing is what runs
        cfg = load_config(
            [],
            [
                f"data.root={root}",
                f"cache.root={work / f'cache-{seed}'}",
                f"backbone.input_size=[{size_h},{size_w}]",
                f"backbone.precision={args.precision}",
                f"backbone.weights={args.weights}",
                f"extract.batch_size={args.batch_size}",
                f"extract.decode_batch_size={args.decode_batch_size}",
                f"extract.keras_backend={args.keras_backend}",
                f"extract.compilation_cache_dir={work / 'jax-cache'}",
            ],
        )
        runs.append(timed_run(cfg, work / "events.jsonl"))
    return runs


def markdown(args: argparse.Namespace, runs: list, init_seconds: float) -> str:
    machine = machine_description()
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    table = "| run | seconds from the run's start | event |\n|---|---|---|\n"
    for name, timeline in zip(("first (fresh Ray)", "re-run (same Ray)"), runs, strict=True):
        table += "".join(f"| {name} | {at:.2f} | {what} |\n" for what, at in timeline)
    return (
        f"\n### Extraction start-up timeline, {datetime.date.today().isoformat()}\n\n"
        f"`python jobs/bench_startup.py --n {args.n} --size {args.size} --precision "
        f"{args.precision} --image-size {args.image_size} --weights {args.weights} "
        f"--batch-size {args.batch_size} --decode-batch-size {args.decode_batch_size} "
        f"--keras-backend {args.keras_backend}` on {machine} (load average at the end {load}), Ray "
        f"{ray.__version__}, GPUs: {int(ray.cluster_resources().get('GPU', 0))}. `ray.init` "
        f"took {init_seconds:.2f} s before the first run. Each run lists a folder of {args.n} "
        "new images and extracts them.\n\n" + table
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=163, help="new images per run")
    parser.add_argument("--size", default="224x224", help="model input size HxW")
    parser.add_argument("--precision", default="bfloat16", help="float32 or bfloat16")
    parser.add_argument("--image-size", default="400x500", help="HxW of the JPEG files")
    parser.add_argument("--weights", default="none", help="backbone.weights (none: no download)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--decode-batch-size", type=int, default=16)
    parser.add_argument("--keras-backend", default="tensorflow", help="the actors' Keras backend")
    add_output_arguments(parser)
    args = parser.parse_args()
    start = time.perf_counter()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    init_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as work:
        runs = run(args, Path(work))
    publish(args, markdown(args, runs, init_seconds))


if __name__ == "__main__":
    main()
