"""Benchmark model quality on the demo set: which option gets closest to the Bayes ceiling.

    python jobs/bench_quality.py                       # every part, 2,000 images at 224x224
    python jobs/bench_quality.py --only tutorial,logreg --docs

A 2,000-image demo set (seed 0, 400x500 JPEGs like `make demo`) at 224x224 with the offline
hed-bsds500 weights, extracted once by emotr's own pipeline into a work folder that later runs
reuse (.emotr/bench/quality/<set>/: images, feature cache, MLflow and Optuna stores, the rows of
the parts already run). Each part is one row: val AUC with a bootstrap 95 % interval (1,000
resamples of the validation images), accuracy at 0.5 and wall time:

- tutorial: the tutorial's head (tune.baseline) fitted once on the cached features;
- search: emotr's search as `emotr run` does it (tune.n_trials trials, default search space);
- finetune: a few trials of deep fine-tuning of block 5 on the cached block4_pool activations;
- logreg: scikit-learn logistic regression (standardised features), fitted on the train split;
  its 5-fold cross-validated AUC over all images is noted beside it;
- ceiling: the generator's Bayes ceiling (emotr.data.demo.bayes_ceiling), a property of the model.

`--only` runs some parts (the others keep their last rows); the table shows every row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import ray
from benchlib import REPO, add_output_arguments, machine_description, publish
from sklearn.metrics import roc_auc_score

from emotr import pipeline
from emotr.config import Config
from emotr.config_io import load_config
from emotr.search.training_set import FeatureSet, load_feature_set
from emotr.track import Tracker

PARTS = ("tutorial", "search", "taps", "finetune", "logreg", "ceiling", "cost")
# Feature taps cached in the same pass as the activation (emotr.taps), and the features choices
# the taps part fits a head on.
TAPS = ("gap5", "gmp5", "gap4", "gap3", "gap5_flip")
CHOICES = (
    "gap5",
    "gmp5",
    "gap4",
    "gap3",
    "gap5_flipavg",
    "gap5+gmp5",
    "gap4+gap5",
    "gap3+gap4+gap5",
)
COLUMNS = ["option", "val AUC", "95 % interval", "accuracy", "wall s", "load", "note"]


def bootstrap_auc(
    y: np.ndarray, scores: np.ndarray, n_resamples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Percentile 95 % interval of the ROC AUC over resamples of the images (seeded)."""
    rng = np.random.default_rng(seed)
    aucs = []
    for _ in range(n_resamples):
        rows = rng.integers(0, len(y), len(y))
        if y[rows].min() != y[rows].max():  # one class drawn: no AUC
            aucs.append(roc_auc_score(y[rows], scores[rows]))
    low, high = np.percentile(aucs, [2.5, 97.5])
    return float(low), float(high)


def scored_row(option: str, y: np.ndarray, scores: np.ndarray, wall_s: float, note: str) -> dict:
    """A table row from validation labels and positive-class scores."""
    low, high = bootstrap_auc(y, scores)
    return {
        "option": option,
        "val_auc": float(roc_auc_score(y, scores)),
        "low": low,
        "high": high,
        "accuracy": float(np.mean((scores >= 0.5) == (y == 1))),
        "wall_s": wall_s,
        "load": os.getloadavg()[0],  # the machine is shared: wall times depend on it
        "note": note,
    }


def bench_config(work: Path, args: argparse.Namespace, *overrides: str) -> Config:
    """conf/demo.yaml with the benchmark's data set, input size and stores in `work`."""
    height, width = args.size
    return load_config(
        [REPO / "conf" / "demo.yaml"],
        [
            f"data.root={work / 'data'}",
            f"data.demo_n={args.n}",
            f"data.seed={args.seed}",
            f"backbone.input_size=[{height},{width}]",
            f"backbone.precision={args.precision}",
            f"cache.root={work / 'cache'}",
            f"tune.storage=sqlite:///{work / 'optuna.db'}",
            f"mlflow.tracking_uri=sqlite:///{work / 'mlflow.db'}",
            f"mlflow.artifact_location={work / 'mlartifacts'}",
            "mlflow.experiment=bench-quality",
            *overrides,
        ],
    )


def prepare(cfg: Config, tracker: Tracker) -> tuple[FeatureSet, dict]:
    """Generate (once) and extract (once) the demo set; its features and how long that took."""
    started = time.perf_counter()
    scan = pipeline.prepare_scan(cfg)
    generated_s = time.perf_counter() - started
    summary = pipeline.extract(cfg, tracker, scan)
    features = load_feature_set(cfg.cache.root, cfg.tune, summary.listing, summary.fingerprint)
    info = {
        "n_images": summary.n_images,
        "n_train": len(features.y_train),
        "n_val": len(features.y_val),
        "listing_s": generated_s,
        "n_extracted": summary.n_extracted,
        "extract_s": summary.wall_seconds,
    }
    print(f"data: {info}", flush=True)
    return features, info


def run_tutorial(cfg: Config, features: FeatureSet, args: argparse.Namespace) -> dict:
    """The tutorial's head, fitted once in this process (early stopping as in a trial)."""
    from emotr.search.head import fit_head

    started = time.perf_counter()
    result = fit_head(
        cfg.tune.baseline,
        features.x_train,
        features.y_train,
        features.x_val,
        features.y_val,
        epochs=cfg.tune.epochs,
        patience=cfg.tune.early_stopping_patience,
        seed=cfg.tune.seed,
    )
    wall = time.perf_counter() - started
    note = f"tune.baseline, best epoch {int(result.metrics['best_epoch'])}"
    return scored_row("tutorial recipe", features.y_val, result.val_proba[:, 1], wall, note)


def run_search_part(
    cfg: Config, features: FeatureSet, tracker: Tracker, option: str, n_trials: int
) -> dict:
    """A fresh study of n_trials trials (search.tune.run_search); the best trial's val scores."""
    import mlflow

    from emotr.search.finetune import predict_batched
    from emotr.search.finetune_set import FineTuneSet
    from emotr.search.head import predict_proba
    from emotr.search.tune import run_search

    study = f"{option}-{int(time.time())}"
    cfg = cfg.model_copy(
        update={"tune": cfg.tune.model_copy(update={"study_name": study, "n_trials": n_trials})}
    )
    result = run_search(cfg, features, tracker, progress=False)
    mlflow.set_tracking_uri(tracker.uri)
    model = mlflow.keras.load_model(f"runs:/{result.best_run_id}/model")
    if isinstance(features, FineTuneSet):  # a fine-tuned model takes the activations
        scores = predict_batched(model, features.a_val).reshape(-1)
    else:
        scores = predict_proba(model, features.x_val)[:, 1]
    note = f"{n_trials} trials, best trial {result.best_trial_number}"
    row = scored_row(option, features.y_val, scores, result.wall_seconds, note)
    return {**row, "params": result.best_params}


def run_logreg(features: FeatureSet) -> dict:
    """Logistic regression on standardised features: train -> val, and 5-fold CV on all."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def model():
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))

    started = time.perf_counter()
    fitted = model().fit(features.x_train, features.y_train)
    wall = time.perf_counter() - started
    scores = fitted.predict_proba(features.x_val)[:, 1]
    x_all = np.concatenate([features.x_train, features.x_val])
    y_all = np.concatenate([features.y_train, features.y_val])
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    cv = cross_val_score(model(), x_all, y_all, cv=folds, scoring="roc_auc")
    note = f"5-fold CV AUC on all images {cv.mean():.3f} +- {cv.std():.3f}"
    return scored_row("logistic regression", features.y_val, scores, wall, note)


def run_ceiling() -> dict:
    """The generator's Bayes ceiling (generate_demo_dataset's default ambiguity model)."""
    import inspect

    from emotr.data.demo import bayes_ceiling, generate_demo_dataset

    defaults = inspect.signature(generate_demo_dataset).parameters
    accuracy, auc = bayes_ceiling(
        defaults["ambiguous_share"].default, defaults["positive_share"].default
    )
    return {
        "option": "Bayes ceiling",
        "val_auc": auc,
        "low": None,
        "high": None,
        "accuracy": accuracy,
        "wall_s": None,
        "note": "of the generator's ambiguity model, not of a sample",
    }


def rich_config(args: argparse.Namespace, *overrides: str) -> Config:
    """The benchmark's config caching every tap of TAPS and the block4_pool activation."""
    taps = f"extract.taps=[{','.join(TAPS)}]"
    return bench_config(args.work, args, taps, "extract.cache_activation=block4_pool", *overrides)


def split_hashes(cfg: Config, listing, features: FeatureSet) -> dict[str, list[str]]:
    """sha256 of the train and val rows of `features`, in their order (load_feature_set's)."""
    from emotr.cache.store import FeatureCache

    cached = FeatureCache.open(cfg.cache.root, features.fingerprint).cached_hashes()
    images = listing.images[listing.images["sha256"].isin(cached)]
    return {
        split: images[images["split"] == split]["sha256"].tolist() for split in ("train", "val")
    }


def run_taps(features: FeatureSet, tracker: Tracker, args, best: dict) -> dict:
    """A head with the search's best params (else the tutorial's) on each features choice, one
    extraction pass for every tap; the logistic regression's val AUC noted beside each."""
    from emotr.cache.sets import open_cache_set
    from emotr.hyperparams import HeadParams
    from emotr.search.head import fit_head
    from emotr.taps import combine_features

    cfg = rich_config(args)
    summary = pipeline.extract(cfg, tracker, pipeline.prepare_scan(cfg))
    print(f"taps, activation: {summary.n_extracted} extracted, {summary.wall_seconds:.0f} s")
    hashes = split_hashes(cfg, summary.listing, features)
    caches = open_cache_set(cfg).caches
    taps = {split: {tap: caches[tap].load(rows) for tap in TAPS} for split, rows in hashes.items()}
    params = HeadParams.model_validate({**cfg.tune.baseline.model_dump(), **best})
    rows = {}
    for choice in CHOICES:
        x_train = combine_features(choice, taps["train"])
        x_val = combine_features(choice, taps["val"])
        chosen = FeatureSet(x_train, features.y_train, x_val, features.y_val, "tap", "split")
        clock = time.perf_counter()
        tune = cfg.tune
        result = fit_head(params, x_train, features.y_train, x_val, features.y_val,
                          epochs=tune.epochs, patience=tune.early_stopping_patience)  # fmt: skip
        wall = time.perf_counter() - clock
        logreg = run_logreg(chosen)
        cv = logreg["note"].split("images ")[-1]
        note = f"search's best head; logistic regression {logreg['val_auc']:.3f} (CV {cv})"
        rows[choice] = scored_row(
            f"features {choice}", features.y_val, result.val_proba[:, 1], wall, note
        )
        print(json.dumps(rows[choice]), flush=True)
    return {"choices": rows, "extract_s": summary.wall_seconds, "n_extracted": summary.n_extracted}


def run_finetune(cfg: Config, features: FeatureSet, tracker: Tracker, args, best: dict) -> dict:
    """A few fine-tuning trials: the search's best head (else the tutorial's) with block 5
    trained on the cached block4_pool activations; the trials vary finetune_lr_scale."""
    from emotr.extract.fingerprint import cache_key
    from emotr.search.finetune_set import load_finetune_set

    head = {**best, "finetune": True}
    overrides = [
        *(f"tune.baseline.{name}={value}" for name, value in head.items()),
        f"tune.baseline.finetune_epochs={args.finetune_epochs}",
        "tune.baseline.finetune_patience=2",
        "tune.search_space={finetune_lr_scale: {type: float, low: 0.01, high: 1.0, log: true}}",
    ]
    cfg = rich_config(args, *overrides)
    summary = pipeline.extract(cfg, tracker, pipeline.prepare_scan(cfg))
    tuning = load_finetune_set(
        cache_key(cfg.cache, cfg.backbone, cfg.decode),
        cfg.backbone,
        cfg.extract.cache_activation,
        summary.listing,
        features,
    )
    return run_search_part(cfg, tuning, tracker, "fine-tuning", args.finetune_trials)


def run_cost(args: argparse.Namespace) -> dict:
    """Training images/s: block 5 + head on cached block4_pool activations (a fine-tuning trial's
    step) against pixels through the whole VGG16, blocks 1-4 frozen (the tutorial's way)."""
    import keras

    from emotr.hyperparams import HeadParams
    from emotr.search.finetune import train_step
    from emotr.search.finetune_model import build_finetune_model
    from emotr.search.head import build_head
    from emotr.taps import activation_shape

    params = HeadParams(finetune=True, batch_size=args.cost_batch)
    shape = activation_shape("block4_pool", args.size)
    cached = build_finetune_model(params, shape, "block4_pool")
    conv_base = keras.applications.VGG16(
        include_top=False, weights=None, input_shape=(*args.size, 3)
    )
    for layer in conv_base.layers:
        layer.trainable = layer.name.startswith("block5")
    pixels = keras.Input((*args.size, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(conv_base(pixels))
    full = keras.Model(pixels, build_head(params, 512)(pooled))
    rng = np.random.default_rng(0)
    y = (np.arange(args.cost_batch) % 2).astype(np.float32).reshape(-1, 1)
    w = np.ones(args.cost_batch, np.float32)
    rates = {}
    for name, model, x_shape in (("cached", cached, shape), ("full", full, (*args.size, 3))):
        step = train_step(model, params)
        x = rng.random((args.cost_batch, *x_shape), dtype=np.float32)
        step(x, y, w)  # trace
        started = time.perf_counter()
        for _ in range(args.cost_steps):
            step(x, y, w)
        rates[name] = args.cost_steps * args.cost_batch / (time.perf_counter() - started)
        print(f"{name}: {rates[name]:.1f} img/s", flush=True)
    return {
        "cached_img_s": rates["cached"],
        "full_img_s": rates["full"],
        "batch": args.cost_batch,
        "load": os.getloadavg()[0],
    }


def cost_markdown(cost: dict, n_train: int) -> str:
    """The fine-tuning cost table."""
    rows = ""
    for name, key in (("block 5 + head on cached block4_pool", "cached_img_s"),
                      ("full VGG16 from pixels, blocks 1-4 frozen", "full_img_s")):  # fmt: skip
        rows += f"| {name} | {cost[key]:.1f} | {n_train / cost[key]:.0f} |\n"
    return (
        f"\nFine-tuning cost per epoch (float32 training steps of {cost['batch']} images, "
        "forward + backward + Adam, all CPUs of this machine, 1-minute load average "
        f"{cost.get('load', float('nan')):.0f} at the end; GPU unmeasured here): cached / "
        f"full = {cost['cached_img_s'] / cost['full_img_s']:.1f}x.\n\n"
        "| training path | img/s | s per epoch of the train split |\n|---|---|---|\n" + rows
    )


def describe_params(params: dict | None) -> str:
    """`: name=value, ...` of a trial's params (floats to 3 digits), or "" without params."""
    if not params:
        return ""
    shown = [f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()]
    return ": " + ", ".join(shown)


def taps_pass(rows: dict) -> str:
    """A sentence on the extraction pass that cached the taps and the activation."""
    if "taps" not in rows:
        return ""
    taps = rows["taps"]
    return (
        f" Taps {', '.join(TAPS)} and the block4_pool activation: one more pass over the "
        f"cached set, {taps['n_extracted']} images in {taps['extract_s']:.0f} s."
    )


def markdown(args: argparse.Namespace, rows: dict, info: dict, cost: dict | None) -> str:
    """The benchmark's section of docs/benchmarks.md."""
    header = f"| {' | '.join(COLUMNS)} |\n|{'---|' * len(COLUMNS)}\n"
    body = ""
    table = {}
    for part, row in rows.items():
        if part == "taps":
            table |= row["choices"]
        elif part != "cost":
            table[part] = row
    for row in table.values():
        interval = "-" if row["low"] is None else f"[{row['low']:.3f}, {row['high']:.3f}]"
        wall = "-" if row["wall_s"] is None else f"{row['wall_s']:.1f}"
        cells = [row["option"], f"{row['val_auc']:.3f}", interval, f"{row['accuracy']:.3f}"]
        load = f"{row['load']:.0f}" if row.get("load") is not None else "-"
        note = row["note"].split(":")[0] + describe_params(row.get("params"))
        body += f"| {' | '.join([*cells, wall, load, note])} |\n"
    machine = machine_description()
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    height, width = args.size
    return (
        f"\n### Model quality on the demo set, {datetime.date.today().isoformat()}\n\n"
        f"`python jobs/bench_quality.py --n {args.n} --size {height}x{width} --precision "
        f"{args.precision} --only {','.join(args.only)}` on {machine} (load average at the end "
        f"{load}), Ray {ray.__version__}. {info.get('n_images')} demo images (seed {args.seed}; "
        f"{info.get('n_train')} train, {info.get('n_val')} validation), hed-bsds500 weights; "
        f"extraction {info.get('extract_s', 0):.0f} s when last run "
        f"({info.get('n_extracted')} images extracted). Rows of parts not in --only come from "
        "earlier runs on the same work folder. Interval: percentile bootstrap over the "
        "validation images (1,000 resamples); load: 1-minute load average when the row "
        f"finished.{taps_pass(rows)}\n\n"
        f"{header}{body}" + (cost_markdown(cost, info.get("n_train", 0)) if cost else "")
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="demo images")
    parser.add_argument("--size", default="224x224", help="model input HxW")
    parser.add_argument("--precision", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--seed", type=int, default=0, help="demo set and split seed")
    parser.add_argument("--only", default=",".join(PARTS), help=f"parts among {PARTS}")
    parser.add_argument("--trials", type=int, default=30, help="trials of the search part")
    parser.add_argument("--finetune-trials", type=int, default=2)
    parser.add_argument("--finetune-epochs", type=int, default=5, help="joint epochs a trial")
    parser.add_argument("--cost-batch", type=int, default=32, help="images per timed step")
    parser.add_argument("--cost-steps", type=int, default=5, help="timed steps per path")
    parser.add_argument("--num-cpus", type=int, default=2, help="local Ray CPUs")
    add_output_arguments(parser)
    args = parser.parse_args()
    args.size = tuple(int(side) for side in args.size.lower().split("x"))
    args.only = [part.strip() for part in args.only.split(",") if part.strip()]
    unknown = set(args.only) - set(PARTS)
    if unknown:
        parser.error(f"--only: unknown parts {sorted(unknown)}; choose among {PARTS}")
    name = f"n{args.n}-{args.size[0]}x{args.size[1]}-{args.precision}-seed{args.seed}"
    args.work = (args.results / "quality" / name).resolve()
    return args


def main() -> None:
    args = parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    saved = args.work / "rows.json"
    state = json.loads(saved.read_text()) if saved.exists() else {"rows": {}, "info": {}}
    cfg = bench_config(args.work, args)
    tracker = features = None
    if set(args.only) - {"ceiling", "cost"}:  # the others need the data set and its features
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False)
        tracker = Tracker(cfg.mlflow)
        features, info = prepare(cfg, tracker)
        if info["n_extracted"] or not state["info"]:
            state["info"] = info
    runners: dict[str, Callable[[], dict]] = {
        "tutorial": lambda: run_tutorial(cfg, features, args),
        "search": lambda: run_search_part(cfg, features, tracker, "search", args.trials),
        "taps": lambda: run_taps(
            features, tracker, args, state["rows"].get("search", {}).get("params", {})
        ),
        "finetune": lambda: run_finetune(
            cfg, features, tracker, args, state["rows"].get("search", {}).get("params", {})
        ),
        "logreg": lambda: run_logreg(features),
        "ceiling": run_ceiling,
        "cost": lambda: run_cost(args),
    }
    for part in args.only:
        print(f"part {part} ...", flush=True)
        state["rows"][part] = runners[part]()
        print(json.dumps(state["rows"][part]), flush=True)
        saved.write_text(json.dumps(state, indent=2))
    rows = {part: state["rows"][part] for part in PARTS if part in state["rows"]}
    if ray.is_initialized():
        ray.shutdown()
    publish(args, markdown(args, rows, state["info"], rows.get("cost")))


if __name__ == "__main__":
    main()
