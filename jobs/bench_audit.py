"""Benchmark `emotr audit`'s wall time on N cached images, extraction excluded.

    python jobs/bench_audit.py --n 20000 --repeats 2

N tiny distinct PNGs in two class folders (the gallery decodes its suspects), and synthetic
512-dim features committed straight to a real feature cache: two overlapping rectified Gaussian
clusters (out-of-fold accuracy near 0.9, as the demo set's) with 5 % of the labels flipped and
1 % near-copies. Then `pipeline.audit` (listing given, MLflow on SQLite) end to end: cold (the
blank references run the backbone once: weights none, the same graph), then warm; and its
phases one by one on the same data. Issue 21's target: under a minute at 20,000 on 2 CPUs.
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from benchlib import add_output_arguments, machine_description, publish
from PIL import Image

from emotr import pipeline
from emotr.cache.store import FeatureCache
from emotr.config_io import load_config
from emotr.extract.fingerprint import cache_key
from emotr.insight import audit as audit_parts
from emotr.track import Tracker

CLASSES = ("negative", "positive")


def write_images(root: Path, n: int, seed: int = 0) -> None:
    """n distinct 16x16 PNGs, alternately under root/negative and root/positive."""
    rng = np.random.default_rng(seed)
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
    for index in range(n):
        pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / CLASSES[index % 2] / f"img_{index:06d}.png")


def synthetic_features(labels: np.ndarray, dim: int, seed: int = 0) -> np.ndarray:
    """Rectified Gaussian clusters, one per class, overlapping; 5 % flipped, 1 % near-copies."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(1.0, 0.35, (len(CLASSES), dim))
    truth = labels.copy()
    flipped = rng.choice(len(labels), len(labels) // 20, replace=False)
    truth[flipped] = 1 - truth[flipped]
    x = np.maximum(centres[truth] + rng.normal(0, 1.0, (len(labels), dim)), 0)
    chosen = rng.choice(len(labels), 2 * (len(labels) // 100), replace=False)
    sources, copies = np.split(chosen, 2)
    x[copies] = x[sources] * 1.01
    return x.astype(np.float32)


def timed(action) -> tuple[float, object]:
    start = time.perf_counter()
    result = action()
    return time.perf_counter() - start, result


def phases(cfg, listing) -> list[tuple[str, float]]:
    """Seconds of each part of the audit, run one by one."""
    key = cache_key(cfg.cache, cfg.backbone, cfg.decode)
    images = listing.images[listing.images["split"].isin(["train", "val"])]
    load, x = timed(
        lambda: audit_parts.load_features(cfg.cache.root, key.fingerprint, images["sha256"])
    )
    labels = images["label"].to_numpy(np.int64)
    fold, probabilities = timed(
        lambda: audit_parts.out_of_fold_probabilities(x, labels, len(CLASSES), cfg.audit)
    )
    table = audit_parts.out_of_fold_table(images, probabilities, CLASSES)
    issues, _ = timed(lambda: audit_parts.rank_label_issues(table, labels, probabilities))
    threshold = cfg.audit.near_duplicate_similarity
    pairs, _ = timed(
        lambda: audit_parts.near_duplicate_pairs(audit_parts.standardised(x), threshold)
    )
    return [
        ("load features", load),
        (f"out-of-fold ({cfg.audit.folds} folds)", fold),
        ("cleanlab find_label_issues", issues),
        ("near-duplicates", pairs),
    ]


def markdown(args, n_audited: int, cold: float, warm: list[float], parts, metrics) -> str:
    machine = machine_description()
    rows = "".join(f"| {name} | {seconds:.2f} |\n" for name, seconds in parts)
    best = min(warm)
    verdict = "met" if best < 60 else "not met"
    return (
        f"\n### The label audit, {datetime.date.today().isoformat()}\n\n"
        f"`python jobs/bench_audit.py --n {args.n} --dim {args.dim} --repeats {args.repeats}` on "
        f"{machine} (load average at the end {', '.join(f'{v:.1f}' for v in os.getloadavg())}). "
        f"{args.n:,} cached images ({n_audited:,} train/val audited), synthetic {args.dim}-dim "
        "features (two overlapping rectified Gaussian clusters, 5 % labels flipped, 1 % "
        f"near-copies) in a real feature cache; extraction excluded. `pipeline.audit` end to "
        f"end (the `audit` MLflow run on SQLite: CSVs, gallery of {args.gallery}): warm "
        f"{', '.join(f'{s:.1f}' for s in warm)} s, **{best:.1f} s** (target under a minute: "
        f"{verdict}); cold {cold:.1f} s (the first audit of a cache also runs the backbone on "
        f"the 8 blank references). Found: {metrics['n_label_issues']:.0f} label issues "
        f"(rate {metrics['label_issue_rate']:.3f}), out-of-fold accuracy "
        f"{metrics['oof_accuracy']:.3f}, {metrics['n_near_duplicate_pairs']:.0f} near-duplicate "
        f"pairs.\n\n| phase (alone) | seconds |\n|---|---|\n{rows}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="cached images")
    parser.add_argument("--dim", type=int, default=512, help="features per image")
    parser.add_argument("--repeats", type=int, default=2, help="warm audits timed")
    parser.add_argument("--gallery", type=int, default=32, help="audit.gallery_size")
    add_output_arguments(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as folder:
        work = Path(folder)
        write_images(work / "data", args.n)
        cfg = load_config(
            [],
            [
                f"data.root={work / 'data'}",
                f"data.classes=[{','.join(CLASSES)}]",
                f"cache.root={work / 'cache'}",
                f"mlflow.tracking_uri=sqlite:///{work / 'mlflow.db'}",
                f"mlflow.artifact_location={work / 'mlartifacts'}",
                "backbone.weights=none",
                f"audit.gallery_size={args.gallery}",
            ],
        )
        listing = pipeline.prepare_listing(cfg)
        key = cache_key(cfg.cache, cfg.backbone, cfg.decode)
        labels = listing.images["label"].to_numpy(np.int64)
        features = synthetic_features(labels, args.dim)
        FeatureCache(key.root, key.fingerprint, key.inputs).commit(
            listing.images["sha256"].tolist(), features, [16] * len(labels), [16] * len(labels)
        )
        tracker = Tracker(cfg.mlflow)
        cold, _ = timed(lambda: pipeline.audit(cfg, tracker, listing))
        warm = []
        for _ in range(args.repeats):
            seconds, (_, found) = timed(lambda: pipeline.audit(cfg, tracker, listing))
            warm.append(seconds)
        parts = phases(cfg, listing)
        n_audited = int(found.metrics["n_images"])
        publish(args, markdown(args, n_audited, cold, warm, parts, found.metrics))


if __name__ == "__main__":
    main()
