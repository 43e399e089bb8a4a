"""Benchmark emotr end to end on a real data set against the plain peer, the tutorial's recipe and
the previous defaults: test AUC on the same images, the val-test gap, wall time.

    python jobs/bench_real.py -c my-set.yaml --name "Emotion6 valence" \\
        --source "owner/repo@commit" [--previous] [--docs] [overrides ...]

The set's config (data.root or data.manifest, cache, mlflow and tune.storage paths outside the
repository) is run as a user would: `emotr run -c FILE` in a subprocess, timed. Each row reads the
numbers `emotr run` logged on its `pipeline` run: the registered version on the test split (the
search never read it), the plain peer (tune.peer: standardised gap5, LogisticRegressionCV) and
the recipe (trial 0) on the same test images. `--previous` also runs the defaults before issue 27
(gap5 only, one validation split, no peer, no ensemble) on the same cache, split and test images.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import yaml
from benchlib import REPO, add_output_arguments, publish, section_heading

from emotr.config_io import load_config

# The defaults before issue 27, as overrides (the search space without `features` comes from a
# file the job writes: an override cannot remove a key).
PREVIOUS = ["extract.taps=[gap5]", "tune.cv_folds=0", "tune.peer=false", "tune.ensemble_size=0"]
PREVIOUS += ["tune.n_trials=30", "tune.pruner=none", "backbone.precision=float32"]
COLUMNS = (
    "| set | defaults | registered | test AUC [95 %] | accuracy | peer test AUC | recipe test AUC "
    "| test - peer | val (CV +- sd) | val - test | emotr run s | load |"
)


def run_emotr(files: list[str], overrides: list[str]) -> float:
    """`emotr run` as a user types it; its wall time in seconds (it must succeed)."""
    command = [str(Path(sys.executable).with_name("emotr")), "run"]
    for file in files:
        command += ["-c", file]
    started = time.perf_counter()
    subprocess.run([*command, *overrides], check=True, cwd=REPO)
    return time.perf_counter() - started


def pipeline_metrics(files: list[str], overrides: list[str]) -> tuple[dict, dict]:
    """Metrics and tags of the newest `pipeline` run of the config's experiment."""
    cfg = load_config(files, overrides)
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    runs = client.search_runs(
        [experiment.experiment_id],
        "attributes.run_name = 'pipeline'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].data.metrics, runs[0].data.tags


def row(name: str, label: str, metrics: dict, tags: dict, wall_s: float) -> str:
    """One table row from a pipeline run's metrics."""

    def number(key: str) -> str:
        return f"{metrics[key]:.3f}" if key in metrics else "-"

    test, peer = metrics.get("test_auc"), metrics.get("peer_test_auc")
    # The registered model's own validation number (an ensemble's, else the best trial's).
    val = metrics.get("registered_val_auc", metrics.get("best_val_auc"))
    gap = f"{val - test:+.3f}" if val is not None and test is not None else "-"
    lift = f"{test - peer:+.3f}" if test is not None and peer is not None else "-"
    interval = f"{number('test_auc')} [{number('test_auc_low')}, {number('test_auc_high')}]"
    val_text = f"{val:.3f}" if val is not None else "-"
    if "registered_val_auc_std" in metrics:
        val_text += f" +- {metrics['registered_val_auc_std']:.3f}"
    return (
        f"| {name} | {label} | {tags.get('registered', '-')} | {interval} | "
        f"{number('test_accuracy')} | {number('peer_test_auc')} | {number('recipe_test_auc')} | "
        f"{lift} | {val_text} | {gap} | "
        f"{wall_s:.0f} | {os.getloadavg()[0]:.1f} |"
    )


def previous_defaults_file(config: str, folder: Path) -> str:
    """The set's YAML with the default search space less `features` (the old default): one
    file, as `emotr run` takes one -c."""
    space = load_config([], []).tune.model_dump(mode="json")["search_space"]
    space.pop("features", None)
    merged = yaml.safe_load(Path(config).read_text()) or {}
    merged.setdefault("tune", {})["search_space"] = space
    path = folder / "previous.yaml"
    path.write_text(yaml.safe_dump(merged))
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", required=True, help="the set's YAML")
    parser.add_argument("--name", required=True, help="the set's name in the table")
    parser.add_argument("--source", default="", help="where the set came from (repo@commit)")
    parser.add_argument("--previous", action="store_true", help="also the previous defaults")
    parser.add_argument("--skip-new", action="store_true", help="the previous defaults alone")
    parser.add_argument("overrides", nargs="*", help="a.b=value for both runs")
    add_output_arguments(parser)
    args = parser.parse_args()
    stamp = time.strftime("%Y%m%d%H%M%S")
    rows = []
    runs = [] if args.skip_new else [("issue 27", args.config, [])]
    with tempfile.TemporaryDirectory(prefix="bench-real-") as folder:
        if args.previous:
            runs.append(("previous", previous_defaults_file(args.config, Path(folder)), PREVIOUS))
        for label, config, extra in runs:
            files = [config]
            tag = label.replace(" ", "")
            overrides = [
                *extra,
                *args.overrides,
                f"tune.study_name=bench-{tag}-{stamp}",
                f"registry.model_name=bench-{tag}",
                "registry.auto_promote=false",
            ]
            wall_s = run_emotr(files, overrides)
            metrics, tags = pipeline_metrics(files, overrides)
            rows.append(row(args.name, label, metrics, tags, wall_s))
            print(rows[-1], flush=True)
    section = (
        section_heading(f"{args.name}: emotr vs the plain peer")
        + f"; data: {args.source or 'see the config'}.\n\n"
        f"{COLUMNS}\n|{'---|' * 12}\n" + "\n".join(rows) + "\n"
    )
    publish(args, section)


if __name__ == "__main__":
    main()
