"""Benchmark the head search: fit speed, trials/min at concurrency 1 and 2, overhead, pruning.

    python jobs/bench_tune.py --trials 10 --prune-trials 16

(a) One head fit, the tutorial's recipe for 100 epochs on 1,304 x 512 features (one TF thread, as
in a trial with tune.cpus_per_trial=1): emotr's fit_head against a plain Keras `fit` with
`validation_data` and `keras.metrics.AUC`. (b) Searches over the default search space with
warm workers, at concurrency 1 and 2: trials/min and per-trial overhead (dispatch to logged, minus
training) as a share of training time. (c) The same search with pruner=median against none.
With `--k-classes K`: (d) instead, the binary search and a K-class one (softmax heads, macro
AUC) on the same feature matrix.
Features are synthetic (low-rank, non-negative like VGG16 GAP features, Bayes AUC about 0.85).
All numbers of one section come from one process on one machine: compare ratios.
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

from emotr.config_io import load_config
from emotr.search.head import fit_head
from emotr.search.training_set import FeatureSet
from emotr.search.tune import run_search
from emotr.track import Tracker

COLUMNS = [
    "search",
    "concurrency",
    "pruner",
    "trials",
    "wall s",
    "trials/min",
    "train s (median)",
    "overhead s (median)",
    "overhead/train",
    "queue s",
    "worker extra s",
    "tell+log s",
    "best AUC",
    "pruned",
]


def synthetic_features(n_train: int = 1304, n_val: int = 326, seed: int = 0) -> FeatureSet:
    """Non-negative features from 32 latent factors; labels from a noisy linear rule on them."""
    rng = np.random.default_rng(seed)
    n = n_train + n_val
    latent = rng.normal(size=(n, 32))
    mixing = rng.normal(size=(32, 512)) / np.sqrt(32)
    x = np.maximum(latent @ mixing + rng.normal(scale=0.5, size=(n, 512)) + 0.3, 0)
    score = latent @ rng.normal(size=32) / np.sqrt(32)
    y = (score + rng.normal(scale=0.75, size=n) > 0).astype(np.int32)
    x = x.astype(np.float32)
    return FeatureSet(x[:n_train], y[:n_train], x[n_train:], y[n_train:], "synthetic", "synthetic")


def k_class_labels(features: FeatureSet, k: int, seed: int = 1) -> FeatureSet:
    """The same features, labelled into k classes: the argmax of k noisy linear scores of x."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([features.x_train, features.x_val])
    weights = rng.normal(size=(x.shape[1], k)) / np.sqrt(x.shape[1])
    scores = (x - x.mean(axis=0)) @ weights
    y = np.argmax(scores + rng.normal(scale=scores.std() * 0.75, size=scores.shape), axis=1)
    y = y.astype(np.int32)
    n_train = len(features.x_train)
    return FeatureSet(
        features.x_train, y[:n_train], features.x_val, y[n_train:], "synthetic-k", "synthetic-k"
    )


def bench_fit(features: FeatureSet, epochs: int) -> tuple[float, float, float]:
    """Seconds of fit_head and of a plain Keras fit for `epochs` epochs, and fit_head's val AUC."""
    import keras

    params = load_config().tune.baseline
    args = (features.x_train, features.y_train, features.x_val, features.y_val)
    fit_head(params, *args, epochs=2, patience=2)  # warm-up: TF start, first trace
    result = fit_head(params, *args, epochs=epochs, patience=epochs)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((features.x_train.shape[1],)),
            keras.layers.Dense(params.units, activation=params.activation),
            keras.layers.Dropout(params.dropout),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.compile(
        keras.optimizers.Adam(params.learning_rate),
        "binary_crossentropy",
        metrics=["accuracy", keras.metrics.AUC(name="auc")],
    )
    start = time.perf_counter()
    model.fit(
        features.x_train,
        features.y_train,
        batch_size=params.batch_size,
        epochs=epochs,
        validation_data=(features.x_val, features.y_val),
        verbose=0,
    )
    return result.train_seconds, time.perf_counter() - start, result.metrics["val_auc"]


def bench_search(features, work: Path, label: str, args, n_classes: int = 2, **tune) -> list[str]:
    """One study; a table row of throughput and overhead."""
    overrides = [f"tune.{key}={value}" for key, value in tune.items()]
    classes = ",".join(f"class{k}" for k in range(n_classes))
    tracking_uri = args.tracking_uri or f"sqlite:///{work / 'mlflow.db'}"
    cfg = load_config(
        [],
        [
            f"tune.storage=sqlite:///{work / 'optuna.db'}",
            f"tune.study_name={label}",
            f"tune.epochs={args.epochs}",
            f"mlflow.tracking_uri={tracking_uri}",
            f"mlflow.artifact_location={work / 'mlartifacts'}",
            f"mlflow.experiment=bench-tune-{int(time.time())}",
            f"data.classes=[{classes}]",
            *overrides,
        ],
    )
    result = run_search(cfg, features, Tracker(cfg.mlflow), progress=False)
    t = result.trials.dropna(subset=["total_s"])
    overhead = t["total_s"] - t["train_s"]
    return [
        label,
        str(cfg.tune.concurrency),
        cfg.tune.pruner,
        str(len(t)),
        f"{result.wall_seconds:.1f}",
        f"{60 * len(t) / result.wall_seconds:.1f}",
        f"{t['train_s'].median():.2f}",
        f"{overhead.median():.2f}",
        f"{(overhead / t['train_s']).median():.0%}",
        f"{t['queue_s'].median():.2f}",
        f"{(t['task_s'] - t['train_s']).median():.2f}",
        f"{(t['tell_s'] + t['log_s']).median():.2f}",
        f"{result.best_value:.4f}",
        str(result.n_pruned),
    ]


def run(args: argparse.Namespace, work: Path) -> tuple[tuple[float, float, float], list]:
    features = synthetic_features()
    fit = bench_fit(features, epochs=args.epochs)
    print(f"fit_head {fit[0]:.2f} s, plain Keras fit {fit[1]:.2f} s, val AUC {fit[2]:.3f}")
    # Warm-up: start the trial workers (TensorFlow import) so that the rows below are steady state.
    bench_search(features, work, "warm-up", args, n_trials=2, concurrency=2)
    if args.k_classes:
        k_features = k_class_labels(features, args.k_classes)
        searches = [
            (f"c2 {name} run {repeat}", matrix, n_classes)
            for repeat in (1, 2)  # alternating: load that changes meanwhile hits both
            for name, matrix, n_classes in (
                ("binary", features, 2),
                (f"{args.k_classes} classes", k_features, args.k_classes),
            )
        ]
        rows = []
        for label, matrix, n_classes in searches:
            row = bench_search(
                matrix, work, label, args, n_classes, n_trials=args.trials, concurrency=2
            )
            rows.append(row)
            print(" | ".join(row), flush=True)
        return fit, rows
    searches = [
        ("c1", {"n_trials": args.trials, "concurrency": 1}),
        ("c2", {"n_trials": args.trials, "concurrency": 2}),
        ("c2-none", {"n_trials": args.prune_trials, "concurrency": 2, "pruner": "none"}),
        ("c2-median", {"n_trials": args.prune_trials, "concurrency": 2, "pruner": "median"}),
    ]
    rows = []
    for label, tune in searches:
        rows.append(bench_search(features, work, label, args, **tune))
        print(" | ".join(rows[-1]), flush=True)
    return fit, rows


def markdown(args: argparse.Namespace, fit: tuple[float, float, float], rows: list) -> str:
    header = f"| {' | '.join(COLUMNS)} |\n|{'---|' * len(COLUMNS)}\n"
    body = "".join(f"| {' | '.join(row)} |\n" for row in rows)
    machine = machine_description()
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    store = args.tracking_uri or "local SQLite"
    k_flag = f" --k-classes {args.k_classes}" if args.k_classes else ""
    k_note = (
        f" The K-class rows label the same matrix into {args.k_classes} classes (argmax of noisy "
        "linear scores): softmax heads, macro one-vs-rest AUC; rows alternate binary and K-class."
        if args.k_classes
        else ""
    )
    return (
        f"\n### Head search, {datetime.date.today().isoformat()}\n\n"
        f"`python jobs/bench_tune.py --trials {args.trials} --prune-trials {args.prune_trials} "
        f"--epochs {args.epochs}{k_flag}` on {machine} (load average at the end {load}), Ray "
        f"{ray.__version__}, MLflow store: {store}. Synthetic 1,304 + 326 x 512 features.\n\n"
        f"Head fit, tutorial recipe, {args.epochs} epochs, one TF thread: emotr `fit_head` "
        f"{fit[0]:.2f} s vs plain Keras `fit(validation_data=...)` {fit[1]:.2f} s "
        f"({fit[1] / fit[0]:.1f}x); val AUC {fit[2]:.3f}.\n\n"
        "Searches (default search space, early stopping patience 20, cpus_per_trial 1, warm "
        "workers): overhead = dispatch-to-logged time minus training; queue = dispatch to task "
        "start; worker extra = plots and model packing in the task; tell+log = Optuna and MLflow "
        f"in the driver.{k_note}\n\n{header}{body}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10, help="trials per throughput search")
    parser.add_argument("--prune-trials", type=int, default=16, help="trials per pruning search")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument(
        "--k-classes", type=int, default=0, help="compare a K-class search with the binary one"
    )
    parser.add_argument("--tracking-uri", default=None, help="default: SQLite in a temp folder")
    parser.add_argument("--num-cpus", type=int, default=2, help="local Ray CPUs")
    add_output_arguments(parser)
    args = parser.parse_args()
    import tensorflow as tf

    # The in-process fit runs like a trial with cpus_per_trial=1 (set before any TF op).
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="bench-tune-") as work:
        fit, rows = run(args, Path(work))
    section = markdown(args, fit, rows)
    publish(args, section)


if __name__ == "__main__":
    main()
