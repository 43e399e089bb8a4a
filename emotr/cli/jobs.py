"""The job commands: demo-data, extract, tune, run, promote, predict; each prints its outcome.

Each loads the config, runs the doctor's checks before its work, then calls the lifecycle verbs
under one `guard`. The pipeline and the demo set (pandas, pyarrow, numpy, Pillow) are imported
inside the commands, so that `emotr --help` answers at once; MLflow (emotr.track, emotr.deploy)
inside the commands that record or load models, so that a job with nothing to do never loads it, and
only once the config is loaded: loading it sets the environment that quiets those libraries.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from rich.table import Table

from emotr.cli.doctor import check_before_work, connect_ray, connect_ray_checking_tracking
from emotr.cli.options import (
    BatchOption,
    ConfigOption,
    ModelOption,
    Overrides,
    OverridesThenInputs,
    load_command_config,
    load_inputs_config,
)
from emotr.cli.output import console, fail, guard, load_keras_quietly, native_stderr_held
from emotr.config import Config
from emotr.config_io import DEFAULT_CONFIG

if TYPE_CHECKING:
    import pandas as pd

    from emotr.pipeline import RunResult
    from emotr.track import Tracker

Prepared = TypeVar("Prepared")  # what a job's work starts from: a Listing or a Scan


def demo_data(
    out: Annotated[Path, typer.Argument(help="Folder to write OUT/negative, OUT/positive into.")],
    n: Annotated[int, typer.Option(help="Number of images.")] = 400,
    size: Annotated[str, typer.Option(help="HEIGHTxWIDTH in pixels.")] = "400x500",
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives the same files.")] = 0,
) -> None:
    """Write the synthetic smile/frown face data set and print its Bayes ceiling."""
    from emotr.data.demo import generate_demo_dataset

    try:
        height, width = (int(part) for part in size.lower().split("x"))
    except ValueError:
        raise fail(f"--size must look like 400x500 (height x width), got {size!r}", 2) from None
    start = time.perf_counter()
    try:
        summary = generate_demo_dataset(out, n=n, size=(height, width), seed=seed)
    except (ValueError, FileExistsError) as error:
        raise fail(str(error), 2) from None
    console.print(
        f"wrote {summary.n_images} images ({summary.n_negative} negative, {summary.n_positive} "
        f"positive) to {out} in {time.perf_counter() - start:.1f} s; manifest {summary.manifest}"
    )
    console.print(
        f"Bayes ceiling of its ambiguity model: accuracy {summary.bayes_accuracy:.3f}, "
        f"AUC {summary.bayes_auc:.3f}"
    )


def extract(config: ConfigOption = DEFAULT_CONFIG, overrides: Overrides = None) -> None:
    """Extract VGG features of every image not yet in the cache (Ray job)."""
    from emotr import pipeline

    cfg = load_command_config(config, overrides)
    with guard(cfg):
        check_before_work(cfg)
        scan = pipeline.prepare_scan(cfg)
        summary = pipeline.idle_extraction(cfg, scan)
        idle = summary is not None
        if summary is None:  # work: only now Ray starts, and MLflow is imported to record it
            connect_ray_checking_tracking(cfg)
            summary = pipeline.extract(cfg, _tracker(cfg), scan)
    console.print(
        f"cache {cfg.cache.root}/{summary.fingerprint}: {summary.n_extracted} extracted, "
        f"{summary.n_cached} already cached, {summary.n_failed} failed "
        f"({summary.images_per_second:.1f} images/s, {summary.wall_seconds:.1f} s)"
    )
    if idle:
        console.print("nothing new to extract: no MLflow run recorded", style="dim")


def tune(config: ConfigOption = DEFAULT_CONFIG, overrides: Overrides = None) -> None:
    """Run the Optuna search of heads on the cached features (trials as Ray tasks)."""
    from emotr import pipeline

    cfg = load_command_config(config, overrides)
    with guard(cfg):
        listing = _start_job(cfg, pipeline.prepare_listing)
        result = pipeline.tune(cfg, _tracker(cfg), listing)
    spread = f" +- {result.best_value_std:.4f}" if result.best_value_std is not None else ""
    peer = f"; the plain peer {result.peer.text()}" if result.peer is not None else ""
    console.print(
        f"best val AUC {result.best_value:.4f}{spread} (trial {result.best_trial_number}); "
        f"tutorial recipe {result.baseline_text()}{peer}"
    )


def validation_line(cfg: Config, result: RunResult) -> str:
    """The best trial, the tutorial's recipe and the plain peer on the search's objective."""
    spread = f" +- {result.best_val_auc_std:.4f}" if result.best_val_auc_std is not None else ""
    if cfg.tune.cv_folds > 1:
        objective = f"{cfg.tune.cv_folds}-fold cross-validated AUC over train + val"
    else:
        objective = "validation AUC (the split the best was chosen on: optimistic)"
    # A fine-tuning trial is scored on the one validation split (no folds, so no spread).
    one_split = cfg.tune.cv_folds > 1 and result.best_val_auc_std is None
    where = ", fine-tuned: on the one validation split, optimistic" if one_split else ""
    line = (
        f"[bold]{objective}: best {result.best_val_auc:.4f}{spread}[/] (trial "
        f"{result.best_trial_number}{where}); the tutorial's recipe {result.baseline}"
    )
    return line + (f"; the plain peer {result.peer}" if result.peer else "")


def run(config: ConfigOption = DEFAULT_CONFIG, overrides: Overrides = None) -> None:
    """Extract, tune and register the best model: the whole job."""
    from emotr import pipeline

    cfg = load_command_config(config, overrides)
    with guard(cfg):
        scan = _start_job(cfg, pipeline.prepare_scan)
        cfg = _finetune_where_gpus(cfg)
        load_keras_quietly()  # registration and the gate build Keras models on the driver
        result = pipeline.run(cfg, _tracker(cfg), scan)
    console.print(f"\n{validation_line(cfg, result)}", highlight=False, soft_wrap=True)
    console.print(f"[bold]registered: {result.chosen}[/]", highlight=False)
    console.print(f"[bold]{result.test}[/] (registered model)", highlight=False, soft_wrap=True)
    if result.test_peer:
        console.print(f"{result.test_peer} (plain peer)", highlight=False, soft_wrap=True)
    console.print(
        f"registered model [bold]{result.model_name}[/] version {result.model_version} "
        f"(alias {cfg.registry.challenger_alias})"
    )
    if result.promotion is None:
        console.print(f"run the promotion gate with: emotr promote -c {config}")
    else:
        console.print(f"promotion gate: {result.promotion}", highlight=False, soft_wrap=True)
    from emotr.track import ui_command

    console.print(f"open the MLflow UI: make ui   (or: {ui_command(cfg.mlflow)})")


def _finetune_where_gpus(cfg: Config) -> Config:
    """cfg as the connected cluster allows: the search also fine-tunes where it has GPUs."""
    import ray

    from emotr.search.gpus import with_gpu_finetuning

    gpus = ray.cluster_resources().get("GPU", 0.0)
    resolved = with_gpu_finetuning(cfg, gpus)
    if resolved is not cfg:
        console.print(
            f"the Ray cluster has {gpus:g} GPU(s): the search also fine-tunes block 5, "
            f"{cfg.tune.gpus_per_finetune_trial:g} GPU per trial (block4_pool activations "
            "cached for it; tune.finetune_on_gpus=false: frozen features only)",
            highlight=False,
        )
    return resolved


def _start_job(cfg: Config, prepare: Callable[[Config], Prepared]) -> Prepared:
    """Check the config and data before Ray starts, so bad input fails in a second; start Ray.

    prepare: pipeline.prepare_listing, or prepare_scan to leave hashes the listing index lacks
    for the extraction's workers.
    """
    check_before_work(cfg)
    prepared = prepare(cfg)
    connect_ray_checking_tracking(cfg)
    return prepared


def _tracker(cfg: Config) -> Tracker:
    from emotr.track import Tracker

    return Tracker(cfg.mlflow)


def promote(
    config: ConfigOption = DEFAULT_CONFIG,
    overrides: Overrides = None,
    min_delta: Annotated[
        float | None,
        typer.Option(help="Promote when the 95 % interval of the AUC gain lies above this."),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Promote the challenger whatever the gate says.")
    ] = False,
    version: Annotated[
        str | None,
        typer.Option(help="Point the champion at this version, without the gate (rollback)."),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="Compare on this ROOT folder or MANIFEST instead of the challenger's test split."
        ),
    ] = None,
) -> None:
    """Gate: score challenger and champion on the same images; move the champion if better."""
    cfg = load_command_config(config, overrides)
    from emotr.deploy.promote import point_champion, promote_challenger

    name, champion = cfg.registry.model_name, cfg.registry.champion_alias
    with guard(cfg):
        if version is not None:
            target = point_champion(cfg, _tracker(cfg), version)
            console.print(f"{name}@{champion} -> version {target.version}")
            return
        load_keras_quietly()  # the gate scores both versions' Keras heads
        tracker = _tracker(cfg)
        images = _comparison_images(cfg, tracker, data) if data is not None else None
        result = promote_challenger(cfg, tracker, min_delta=min_delta, force=force, images=images)
    verb = "promoted" if result.decision.promote else "not promoted"
    console.print(
        f"challenger version {result.challenger.version} {verb}: {result.decision.reason}",
        highlight=False,
        soft_wrap=True,  # one line per decision, whatever the terminal's width
    )
    console.print(f"{name}@{champion} -> version {result.champion_version}")


def _comparison_images(cfg: Config, tracker: Tracker, data: Path) -> pd.DataFrame:
    """path, sha256, label of every image under a folder or in a manifest (for --data), labelled
    by the challenger's classes: label k is the class it answers as p_<class k>."""
    from emotr import pipeline
    from emotr.deploy.registry import get_version, version_classes

    challenger = get_version(tracker, cfg.registry.model_name, cfg.registry.challenger_alias)
    section = {"manifest": str(data)} if data.is_file() else {"root": str(data), "manifest": None}
    section |= {"classes": version_classes(challenger), "generate_demo": False}
    other = cfg.model_copy(update={"data": cfg.data.model_copy(update=section)})
    with guard(other):  # an error names the key of --data's config, not the file's
        listing = pipeline.prepare_listing(other)
    return listing.images[["path", "sha256", "label"]].reset_index(drop=True)


def predict(
    arguments: OverridesThenInputs,
    config: ConfigOption = DEFAULT_CONFIG,
    model: ModelOption = None,
    output: Annotated[
        Path | None, typer.Option(help="Write every row to this .parquet or .csv file.")
    ] = None,
    batch: BatchOption = None,
) -> None:
    """Classify images with a registered model (Ray Data job); a bad file is a row with its reason.

    Runs extraction's pipeline (decode tasks, extractor actors) with the model's own decode
    rules and backbone; images whose features are cached skip the backbone.
    """
    cfg, inputs = load_inputs_config(config, arguments, batch)
    from emotr.deploy.predict import (
        check_output,
        list_inputs,
        model_uri,
        open_predictor,
        predict_paths,
        write_predictions,
    )

    with guard(cfg):
        uri = model_uri(cfg, model)
        if output is not None:
            check_output(output)
        paths = list_inputs(inputs)
        with native_stderr_held():  # the driver's TensorFlow start-up lines (the head runs here)
            predictor = open_predictor(cfg, _tracker(cfg), uri)
        rows = predict_paths(cfg, predictor, paths, connect=lambda: connect_ray(cfg))
        if output is not None:
            summary = write_predictions(rows, output, predictor.scorer.spec.classes)
            n_images, n_failed = summary.n_images, summary.n_failed
            shown = f"{n_images} images, {n_failed} could not be read; wrote {output}"
        else:
            shown, n_images, n_failed = _prediction_table(rows, predictor.scorer.spec.classes)
    console.print(shown)
    if n_images and n_failed == n_images:
        raise fail(f"none of the {n_images} images could be read")


def _prediction_table(
    chunks: Iterable[pd.DataFrame], classes: Sequence[str]
) -> tuple[Table, int, int]:
    """Rows of whole file names (two files must be told apart), label, P(class) each, error."""
    columns = [f"P({name})" for name in classes]
    table = Table("image", "label", *columns, "error")
    for column in table.columns:
        column.overflow = "fold"
    n_images = n_failed = 0
    for frame in chunks:
        probabilities = frame[[f"p_{name}" for name in classes]].to_numpy(dtype=float)
        for row, values in zip(frame.itertuples(index=False), probabilities, strict=True):
            bad = isinstance(row.error, str)
            shown = ["-"] * len(classes) if bad else [f"{value:.3f}" for value in values]
            table.add_row(row.path, row.label or "-", *shown, row.error or "")
            n_images, n_failed = n_images + 1, n_failed + bad
    return table, n_images, n_failed
