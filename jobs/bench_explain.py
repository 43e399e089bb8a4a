"""Benchmark `emotr explain` against `emotr predict`: images/s of each on the same images.

    python jobs/bench_explain.py --n 300 --size 224 --weights hed-bsds500

A smoke `emotr run` (pipeline.run: extraction, a short search, registration) on --n demo faces
registers a trained head in a temporary SQLite store. Then, on --n other demo faces (another
seed: not in the feature cache, so that both jobs decode every file and run VGG16), explain's
job (emotr.insight.explain.explain_paths: decode, VGG16 block outputs, head and head gradient in
the actors; overlay PNGs, the CSV and the contact sheet on the driver) and predict's job
(emotr.deploy.predict.predict_paths, rows written to a CSV) alternate on one private 2-CPU Ray,
--rounds times, so that other work on a shared machine hits both alike. The target: explain at
>= 0.8 x predict's images/s. --sheet FILE also keeps a contact sheet of the first 16 faces.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchlib import add_output_arguments, publish

from emotr import pipeline
from emotr.config_io import load_config
from emotr.data.demo import generate_demo_dataset
from emotr.deploy.predict import open_predictor, predict_paths, write_predictions
from emotr.insight.explain import explain_paths
from emotr.track import Tracker


def register(work: Path, args: argparse.Namespace):
    """A trained head registered by a smoke `emotr run` on demo faces, in a store under work."""
    cfg = load_config(
        [],
        [
            f"mlflow.tracking_uri=sqlite:///{work / 'mlflow.db'}",
            f"mlflow.artifact_location={work / 'artifacts'}",
            f"cache.root={work / 'cache'}",
            f"tune.storage=sqlite:///{work / 'optuna.db'}",
            f"data.root={work / 'train'}",
            f"backbone.weights={args.weights}",
            f"backbone.input_size=[{args.size},{args.size}]",
            f"extract.batch_size={args.batch}",
            "tune.n_trials=2",
            "tune.concurrency=2",
            "tune.epochs=30",
            "registry.auto_promote=false",
            "ray.num_cpus=2",
        ],
    )
    generate_demo_dataset(work / "train", n=args.n, size=(args.size, args.size), seed=0)
    tracker = Tracker(cfg.mlflow)
    result = pipeline.run(cfg, tracker, pipeline.prepare_scan(cfg))
    uri = f"models:/{result.model_name}/{result.model_version}"
    return cfg, open_predictor(cfg, tracker, uri), result


def timed(work: Path, paths: list[str], run) -> float:
    """Images per second of one pass writing under work/out (emptied first)."""
    shutil.rmtree(work / "out", ignore_errors=True)
    started = time.perf_counter()
    run(work / "out")
    return len(paths) / (time.perf_counter() - started)


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="images (each of the two sets)")
    parser.add_argument("--size", type=int, default=224, help="image and backbone input side")
    parser.add_argument("--weights", default="hed-bsds500", help="backbone.weights")
    parser.add_argument("--batch", type=int, default=16, help="extract.batch_size")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two jobs")
    parser.add_argument("--sheet", type=Path, help="write a contact sheet of 16 faces here")
    add_output_arguments(parser)
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-explain-") as folder:
        work = Path(folder)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        cfg, predictor, result = register(work, args)
        size = (args.size, args.size)
        generate_demo_dataset(work / "faces", n=args.n, size=size, seed=1)
        paths = sorted(str(p) for p in (work / "faces").rglob("*.jpg"))
        if args.sheet:
            explain_paths(cfg, predictor, paths[:: max(1, len(paths) // 16)][:16], work / "ex")
            shutil.copy(work / "ex" / "contact_sheet.png", args.sheet)

        def explain(out: Path) -> None:
            summary = explain_paths(cfg, predictor, paths, out, progress=False)
            assert summary.n_overlays == len(paths), summary

        def predict(out: Path) -> None:
            rows = predict_paths(cfg, predictor, paths, progress=False)
            assert write_predictions(rows, out / "p.csv", predictor.scorer.spec.classes).n_images

        explains, predicts = [], []
        for _ in range(args.rounds):
            predicts.append(timed(work, paths, predict))
            explains.append(timed(work, paths, explain))
            print(f"predict {predicts[-1]:.1f} img/s, explain {explains[-1]:.1f} img/s", flush=True)
        ray.shutdown()
    load_after = os.getloadavg()
    ratios = [e / p for e, p in zip(explains, predicts, strict=True)]
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, load average (1 min) "
        f"{load_before[0]:.1f} before and {load_after[0]:.1f} after"
    )
    section = (
        f"\n### `emotr explain` against `emotr predict` ({datetime.date.today()})\n\n"
        f"`python jobs/bench_explain.py --n {args.n} --size {args.size} --weights {args.weights} "
        f"--batch {args.batch} --rounds {args.rounds}` on {machine}; {args.n} demo faces "
        f"({args.size}x{args.size}, not in the cache) explained by a head trained by a smoke "
        f"`emotr run` (val AUC {result.best_val_auc:.3f}); both jobs on one private 2-CPU Ray, "
        "alternating, actor start included in every pass.\n\n"
        "| measure | value |\n| --- | --- |\n"
        f"| predict's job (predict_paths, CSV) | "
        f"{', '.join(f'{p:.1f}' for p in predicts)} img/s |\n"
        f"| explain's job (explain_paths: maps, overlay PNGs, CSV, contact sheet) | "
        f"{', '.join(f'{e:.1f}' for e in explains)} img/s |\n"
        f"| explain / predict | {', '.join(f'{r:.2f}' for r in ratios)} (median "
        f"{statistics.median(ratios):.2f}; target >= 0.8) |\n"
    )
    publish(args, section)


if __name__ == "__main__":
    main()
