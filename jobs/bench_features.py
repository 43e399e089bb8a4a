"""Which cached features carry a set's signal: the plain peer of emotr's search (tune.peer:
standardised features, emotr.search.logreg's regression) on each features choice, by repeated
cross-validation over every listed image, and fitted on train + val of several splits, scored on
their test images.

    python jobs/bench_features.py -c my-set.yaml --name "Emotion6 valence" \\
        --choices gap5 gap4_flipavg gap4_flipavg+gap1_flipavg gap4_flipavg@sqrt [--docs]

The set's taps must be cached (`emotr extract -c my-set.yaml extract.taps=[...]`); nothing is
extracted here. A choice is a features choice (emotr.taps) with an optional `@transform` applied
before standardising: `sqrt` (signed square root), `log` (log1p of the features over their
median), `l2` (rows scaled to unit length), `sqrtl2` (both). The repeated CV uses every image of
the listing (test split included): 5-fold x 2 by default, a number over all photos and not one
split's luck; the test columns are one fit per split seed (data.seed), as `emotr run` splits.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from benchlib import add_output_arguments, publish, section_heading
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import RepeatedStratifiedKFold
from sklearn.preprocessing import StandardScaler

from emotr.config_io import load_config
from emotr.data.listing import list_images, resolve_classes
from emotr.extract.fingerprint import compute_fingerprint
from emotr.hyperparams import HeadParams
from emotr.search.logreg import fit_regression
from emotr.search.study import peer_params
from emotr.search.training_set import tap_caches
from emotr.taps import combine_features, taps_of

TRANSFORMS = {
    "": lambda x: x,
    "sqrt": lambda x: np.sign(x) * np.sqrt(np.abs(x)),
    "log": lambda x: np.log1p(np.maximum(x, 0) / (np.median(x[x > 0]) + 1e-9)),
    "l2": lambda x: x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-9),
}
TRANSFORMS["sqrtl2"] = lambda x: TRANSFORMS["l2"](TRANSFORMS["sqrt"](x))


def peer_probabilities(
    params: HeadParams, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray
) -> np.ndarray:
    """The search's plain peer fitted on the training rows (standardised on them), its class
    probabilities of the test rows."""
    scaler = StandardScaler().fit(x_train)
    n_classes = len(np.unique(y_train))
    regression = fit_regression(params, scaler.transform(x_train), y_train, 0, n_classes)
    return regression.predict_proba(scaler.transform(x_test))


def auc(y: np.ndarray, probabilities: np.ndarray) -> float:
    """AUC, macro one-vs-rest for more than two classes."""
    if probabilities.shape[1] == 2:
        return float(roc_auc_score(y, probabilities[:, 1]))
    return float(roc_auc_score(y, probabilities, multi_class="ovr", average="macro"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", required=True, help="the set's YAML")
    parser.add_argument("--name", required=True, help="the set's name in the table")
    parser.add_argument("--choices", nargs="+", required=True, help="features[@transform]")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seeds", default="0,1,2", help="split seeds of the test columns")
    parser.add_argument("overrides", nargs="*", help="a.b=value")
    add_output_arguments(parser)
    args = parser.parse_args()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    choices = [choice.partition("@") for choice in args.choices]
    for _, _, how in choices:
        if how not in TRANSFORMS:
            parser.error(f"unknown transform {how!r}; use one of {sorted(TRANSFORMS)[1:]}")
    listings = {}
    for seed in seeds:
        cfg = load_config([args.config], [*args.overrides, f"data.seed={seed}"])
        images = list_images(resolve_classes(cfg.data)).images
        listings[seed] = images.drop_duplicates("sha256").set_index("sha256")
    fingerprint, _ = compute_fingerprint(cfg.backbone, cfg.decode)
    params = peer_params(cfg.tune)
    taps = {tap for features, _, _ in choices for tap in taps_of(features)}
    caches = tap_caches(cfg.cache.root, fingerprint, sorted(taps))
    keys = listings[seeds[0]].index.tolist()
    matrices = {tap: cache.load(keys) for tap, cache in caches.items()}
    y = listings[seeds[0]]["label"].to_numpy()
    folds = RepeatedStratifiedKFold(n_splits=args.folds, n_repeats=args.repeats, random_state=0)
    rows = []
    for features, _, how in choices:
        start = time.perf_counter()
        x = TRANSFORMS[how](combine_features(features, matrices))
        scores = np.array(
            [
                auc(y[held], peer_probabilities(params, x[fit], y[fit], x[held]))
                for fit, held in folds.split(x, y)
            ]
        )
        tests = []
        for seed in seeds:
            test = listings[seed].loc[keys, "split"].to_numpy() == "test"
            tests.append(auc(y[test], peer_probabilities(params, x[~test], y[~test], x[test])))
        spread = scores.std() / np.sqrt(len(scores))
        rows.append(
            f"| {features}{'@' + how if how else ''} | {x.shape[1]} | {scores.mean():.3f} +- "
            f"{spread:.3f} | " + " | ".join(f"{t:.3f}" for t in tests) + f" | {np.mean(tests):.3f}"
            f" | {time.perf_counter() - start:.0f} |"
        )
        print(rows[-1], flush=True)
    header = (
        f"| features | dim | {args.folds}-fold x {args.repeats} CV AUC +- se | "
        + " | ".join(f"test seed {seed}" for seed in seeds)
        + " | test mean | s |\n|"
        + "---|" * (len(seeds) + 5)
    )
    section = (
        section_heading(f"{args.name}: the plain peer on features choices")
        + f", {len(keys)} images, cache {fingerprint}, load {os.getloadavg()[0]:.1f}.\n\n"
        f"{header}\n" + "\n".join(rows) + "\n"
    )
    publish(args, section)


if __name__ == "__main__":
    main()
