"""The `emotr` command: parse, load and validate the config, connect to Ray, call pipeline verbs."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table
from rich.text import Text

from emotr.cli.messages import describe_os_error
from emotr.config import DEFAULT_CONFIG, Config, ConfigError, load_config
from emotr.redaction import RedactingFilter, redact

app = typer.Typer(
    help="Image emotion recognition by transfer learning: VGG16 features on Ray, heads tuned "
    "with Optuna, tracked in MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
cache_app = typer.Typer(help="Inspect, verify and export the feature cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


class _RedactingConsole(Console):
    """A console that masks the password of any URI in the strings it prints (config values)."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        super().print(*(redact(o) if isinstance(o, str) else o for o in objects), **kwargs)


console = _RedactingConsole()
errors = _RedactingConsole(stderr=True, soft_wrap=True)

ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="YAML config: defaults <- this file <- overrides.")
]
Overrides = Annotated[
    list[str] | None,
    typer.Argument(
        help="Overrides as section.key=value, e.g. tune.n_trials=10.", show_default=False
    ),
]


def _fail(message: str, code: int = 1) -> typer.Exit:
    errors.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


@app.callback()
def main_options(
    debug: Annotated[
        bool,
        typer.Option(
            "--debug", envvar="EMOTR_DEBUG", help="Show the traceback of errors (or EMOTR_DEBUG=1)."
        ),
    ] = False,
) -> None:
    """Options shared by every command."""
    _settings["debug"] = debug


_settings = {"debug": False}


def _quiet_native_logs() -> None:
    """Keep TensorFlow's and gRPC's start-up lines off the console; set before either loads."""
    if not _settings["debug"]:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # CPU-feature and TensorRT notices
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    # MLflow's artifact download bars (registering and loading models) would cut into the output.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _load(config: Path, overrides: list[str] | None) -> Config:
    _quiet_native_logs()
    handler = RichHandler(console=errors)
    handler.addFilter(RedactingFilter())  # on the handler: Ray's, MLflow's and Optuna's lines too
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[handler])
    try:
        return load_config([config], overrides or [])
    except ConfigError as error:
        raise _fail(str(error), code=2) from None


def _connect_ray(cfg: Config) -> None:
    """Connect once, then check the cluster (nodes, temp dirs, the backend on every node)."""
    import ray

    from emotr.ops import doctor

    if ray.is_initialized():
        return
    where, backend = _ray_where(cfg), cfg.extract.keras_backend
    _require_green([doctor.check_ray(where, backend, lambda: _init_ray(cfg), cfg.ray.address)])


def _ray_where(cfg: Config) -> str:
    if cfg.ray.address:
        return f"ray.address={cfg.ray.address}"
    if os.environ.get("RAY_ADDRESS"):
        return f"RAY_ADDRESS={os.environ['RAY_ADDRESS']} (the job's cluster)"
    return "a private local Ray (ray.address null)"


def _init_ray(cfg: Config) -> None:
    import ray

    if cfg.ray.address:
        ray.init(address=cfg.ray.address, log_to_driver=False)
    elif os.environ.get("RAY_ADDRESS"):
        # Under `ray job submit` the job's driver joins its own cluster, named by RAY_ADDRESS.
        ray.init(log_to_driver=False)
    else:
        # "local": a private Ray, never a stray cluster that Ray's temp folder still names.
        kwargs = {"num_cpus": cfg.ray.num_cpus} if cfg.ray.num_cpus else {}
        ray.init(address="local", include_dashboard=False, log_to_driver=False, **kwargs)


def _tracker(cfg: Config):
    from emotr.track import Tracker

    return Tracker(cfg.mlflow)


def _run_guarded(action, cfg: Config | None = None):
    """Run an action, turning errors a user can fix into one clear line and exit code 1.

    Only emotr's own errors and OSErrors (which name a path) are expected; anything else is a bug
    and keeps its traceback. --debug shows the traceback of expected errors too.
    """
    from emotr.errors import EmotrError

    try:
        return action()
    except EmotrError as error:
        if _settings["debug"]:
            raise
        raise _fail(str(error)) from None
    except OSError as error:
        if _settings["debug"]:
            raise
        raise _fail(describe_os_error(error, cfg)) from None


def _load_with_listing(config: Path, overrides: list[str] | None, *, scan: bool = False):
    """Validate config and data before Ray starts, so bad input fails in a second; then start Ray.

    scan: leave hashes the listing index lacks for the extraction's workers (a Scan).
    """
    from emotr import pipeline

    cfg = _load(config, overrides)
    _check_before_work(cfg)
    prepare = pipeline.prepare_scan if scan else pipeline.prepare_listing
    listing = _run_guarded(lambda: prepare(cfg), cfg)
    _connect_ray_checking_tracking(cfg)
    return cfg, listing


def _on_cluster(cfg: Config) -> bool:
    """Whether this run joins a Ray cluster: ray.address set, or started by `ray job submit`."""
    return bool(cfg.ray.address or os.environ.get("RAY_ADDRESS"))


def _check_before_work(cfg: Config) -> None:
    """The doctor's local checks a job runs first (paths, weights, cache); red ones end it."""
    from emotr.ops import doctor

    _require_green(list(doctor.check_stores(cfg, _on_cluster(cfg), tracking=False)))


def _connect_ray_checking_tracking(cfg: Config) -> None:
    """Start Ray while a thread checks the tracking store and Optuna storage; red ends the job.

    Both take seconds and wait on different things: Ray on the processes it starts, the
    check on MLflow's import and the store's answer. (Ray starts in this, the main thread: it
    sets signal handlers.)
    """
    from emotr.ops import doctor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="emotr-checks") as pool:
        checks = pool.submit(lambda: list(doctor.check_tracking_stores(cfg, _on_cluster(cfg))))
        _connect_ray(cfg)
        _require_green(checks.result())


def _require_green(checks: list) -> None:
    red = [check for check in checks if not check.ok]
    for check in red:
        errors.print(Text.assemble(("✗ " + check.name, "bold red"), " ", check.text()))
    if red and _settings["debug"] and red[0].error is not None:
        raise red[0].error
    if red:
        raise _fail(f"{len(red)} check(s) failed; `emotr doctor -c FILE` runs them all")


@app.command("demo-data")
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
        raise _fail(f"--size must look like 400x500 (height x width), got {size!r}", 2) from None
    start = time.perf_counter()
    try:
        summary = generate_demo_dataset(out, n=n, size=(height, width), seed=seed)
    except (ValueError, FileExistsError) as error:
        raise _fail(str(error), 2) from None
    console.print(
        f"wrote {summary.n_images} images ({summary.n_negative} negative, {summary.n_positive} "
        f"positive) to {out} in {time.perf_counter() - start:.1f} s; manifest {summary.manifest}"
    )
    console.print(
        f"Bayes ceiling of its ambiguity model: accuracy {summary.bayes_accuracy:.3f}, "
        f"AUC {summary.bayes_auc:.3f}"
    )


@app.command()
def extract(config: ConfigOption = DEFAULT_CONFIG, overrides: Overrides = None) -> None:
    """Extract VGG16 features of every image not yet in the cache (Ray job)."""
    from emotr import pipeline

    cfg = _load(config, overrides)
    _check_before_work(cfg)
    scan = _run_guarded(lambda: pipeline.prepare_scan(cfg), cfg)
    summary = _run_guarded(lambda: pipeline.idle_extraction(cfg, scan), cfg)
    idle = summary is not None
    if summary is None:  # work: only now Ray starts, and MLflow is imported to record it
        _connect_ray_checking_tracking(cfg)
        summary = _run_guarded(lambda: pipeline.extract(cfg, _tracker(cfg), scan), cfg)
    console.print(
        f"cache {cfg.cache.root}/{summary.fingerprint}: {summary.n_extracted} extracted, "
        f"{summary.n_cached} already cached, {summary.n_failed} failed "
        f"({summary.images_per_second:.1f} images/s, {summary.wall_seconds:.1f} s)"
    )
    if idle:
        console.print("nothing new to extract: no MLflow run recorded", style="dim")


@app.command()
def tune(config: ConfigOption = DEFAULT_CONFIG, overrides: Overrides = None) -> None:
    """Run the Optuna search of heads on the cached features (trials as Ray tasks)."""
    from emotr import pipeline

    cfg, listing = _load_with_listing(config, overrides)
    result = _run_guarded(lambda: pipeline.tune(cfg, _tracker(cfg), listing), cfg)
    console.print(
        f"best val AUC {result.best_value:.4f} (trial {result.best_trial_number}); "
        f"tutorial recipe {result.baseline_text()}"
    )


@app.command()
def run(config: ConfigOption = DEFAULT_CONFIG, overrides: Overrides = None) -> None:
    """Extract, tune and register the best model: the whole job."""
    from emotr import pipeline
    from emotr.track import ui_command

    cfg, scan = _load_with_listing(config, overrides, scan=True)
    _load_keras_quietly()  # registration and the gate build Keras models on the driver
    result = _run_guarded(lambda: pipeline.run(cfg, _tracker(cfg), scan), cfg)
    console.print(
        f"\n[bold]best validation AUC {result.best_val_auc:.4f}[/] (trial "
        f"{result.best_trial_number}; the tutorial's recipe: {result.baseline})"
    )
    console.print(
        f"registered model [bold]{result.model_name}[/] version {result.model_version} "
        f"(alias {cfg.registry.challenger_alias})"
    )
    if result.promotion is None:
        console.print(f"run the promotion gate with: emotr promote -c {config}")
    else:
        console.print(f"promotion gate: {result.promotion}", highlight=False, soft_wrap=True)
    console.print(f"open the MLflow UI: make ui   (or: {ui_command(cfg.mlflow)})")


@app.command()
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
            help="Compare on this ROOT folder or MANIFEST instead of the validation split."
        ),
    ] = None,
) -> None:
    """Gate: score challenger and champion on the same images; move the champion if better."""
    cfg = _load(config, overrides)
    name, champion = cfg.registry.model_name, cfg.registry.champion_alias
    if version is not None:
        from emotr.deploy.promote import point_champion

        target = _run_guarded(lambda: point_champion(cfg, _tracker(cfg), version), cfg)
        console.print(f"{name}@{champion} -> version {target.version}")
        return
    from emotr.deploy.promote import promote_challenger

    _load_keras_quietly()  # the gate scores both versions' Keras heads
    images = _comparison_images(cfg, data) if data is not None else None
    result = _run_guarded(
        lambda: promote_challenger(
            cfg, _tracker(cfg), min_delta=min_delta, force=force, images=images
        ),
        cfg,
    )
    verb = "promoted" if result.decision.promote else "not promoted"
    console.print(
        f"challenger version {result.challenger.version} {verb}: {result.decision.reason}",
        highlight=False,
        soft_wrap=True,  # one line per decision, whatever the terminal's width
    )
    console.print(f"{name}@{champion} -> version {result.champion_version}")


def _comparison_images(cfg: Config, data: Path):
    """path, sha256, label of every image under a folder or in a manifest (for --data)."""
    from emotr import pipeline

    section = {"manifest": str(data)} if data.is_file() else {"root": str(data), "manifest": None}
    other = cfg.model_copy(
        update={"data": cfg.data.model_copy(update={**section, "generate_demo": False})}
    )
    listing = _run_guarded(lambda: pipeline.prepare_listing(other), other)
    return listing.images[["path", "sha256", "label"]].reset_index(drop=True)


@app.command()
def predict(
    inputs: Annotated[
        list[Path], typer.Argument(help="Image files, folders (every image below) or manifests.")
    ],
    config: ConfigOption = DEFAULT_CONFIG,
    model: Annotated[
        str | None,
        typer.Option(help="models:/NAME@ALIAS, models:/NAME/N, or a version or alias."),
    ] = None,
    output: Annotated[
        Path | None, typer.Option(help="Write every row to this .parquet or .csv file.")
    ] = None,
    batch: Annotated[
        int | None,
        typer.Option(min=1, help="Images per VGG16 forward pass (default: extract.batch_size)."),
    ] = None,
) -> None:
    """Classify images with a registered model (Ray Data job); a bad file is a row with its reason.

    Runs extraction's pipeline (decode tasks, extractor actors) with the model's own decode
    rules and backbone; images whose features are cached skip VGG16.
    """
    from emotr.deploy import predict as batch_predict

    cfg = _load(config, [f"extract.batch_size={batch}"] if batch else [])
    uri = batch_predict.model_uri(cfg, model)
    if output is not None:
        _run_guarded(lambda: batch_predict.check_output(output), cfg)
    paths = _run_guarded(lambda: batch_predict.list_inputs(inputs), cfg)
    with _native_stderr_held():  # the driver's TensorFlow start-up lines (the head runs here)
        predictor = _run_guarded(lambda: batch_predict.open_predictor(cfg, _tracker(cfg), uri), cfg)
    rows = batch_predict.predict_paths(cfg, predictor, paths, connect=lambda: _connect_ray(cfg))
    if output is not None:
        summary = _run_guarded(lambda: batch_predict.write_predictions(rows, output), cfg)
        n_images, n_failed = summary.n_images, summary.n_failed
        console.print(f"{n_images} images, {n_failed} could not be read; wrote {output}")
    else:
        table, n_images, n_failed = _run_guarded(lambda: _prediction_table(rows), cfg)
        console.print(table)
    if n_images and n_failed == n_images:
        raise _fail(f"none of the {n_images} images could be read")


def _prediction_table(chunks) -> tuple[Table, int, int]:
    """Rows of whole file names (two files must be told apart), label, P(positive), error."""
    table = Table("image", "label", "P(positive)", "error")
    for column in table.columns:
        column.overflow = "fold"
    n_images = n_failed = 0
    for frame in chunks:
        for row in frame.itertuples(index=False):
            bad = isinstance(row.error, str)
            probability = "-" if bad else f"{row.p_positive:.3f}"
            table.add_row(row.path, row.label or "-", probability, row.error or "")
            n_images, n_failed = n_images + 1, n_failed + bad
    return table, n_images, n_failed


@contextmanager
def _native_stderr_held() -> Iterator[None]:
    """TensorFlow's C++ start-up lines go to a file, shown only if the block fails (or --debug).

    TensorFlow 2.21 logs them through absl before TF_CPP_MIN_LOG_LEVEL applies, straight to
    file descriptor 2, so only redirecting the descriptor keeps them off the console.
    """
    if _settings["debug"]:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            sys.stderr.flush()
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _load_keras_quietly() -> None:
    """Import Keras (and so TensorFlow) and make a first tensor, its native start-up lines held.

    Both print: the import its absl/oneDNN lines, the first tensor the device probe (cuInit).
    """
    with _native_stderr_held():
        import keras

        keras.ops.convert_to_tensor([0.0])


@app.command()
def doctor(config: ConfigOption = DEFAULT_CONFIG, overrides: Overrides = None) -> None:
    """Check, in seconds, everything a job needs; one line per check, exit 1 on any red.

    Weights, data, cache and artifact roots (written and deleted), tracking server and Optuna
    storage (reachable, schema), Ray (nodes, CPUs/GPUs, the Keras backend on every node) and,
    on a cluster, relative paths that a submitted job would resolve in a temporary folder.
    """
    from emotr.ops import doctor as checks

    cfg = _load(config, overrides)
    results = []
    on_cluster = _on_cluster(cfg)
    for check in checks.check_all(cfg, on_cluster, _ray_where(cfg), lambda: _init_ray(cfg)):
        mark, style = ("✓", "bold green") if check.ok else ("✗", "bold red")
        line = Text.assemble((f"{mark} {check.name:<9}", style), " ", check.text())
        console.print(line, soft_wrap=True)  # one line per check, whatever the width
        results.append(check)
    n_red = sum(not check.ok for check in results)
    if n_red:
        raise _fail(f"{n_red} of {len(results)} checks failed")
    console.print(f"all {len(results)} checks passed")


@cache_app.command("ls")
def cache_ls(config: ConfigOption = DEFAULT_CONFIG, overrides: Overrides = None) -> None:
    """List fingerprints in the cache with their rows and bytes."""
    from emotr.cache.maintenance import list_caches

    cfg = _load(config, overrides)
    table = Table("fingerprint", "holds", "rows", "parts", "MiB", "backbone", "weights", "input")
    for info in list_caches(cfg.cache.root):
        table.add_row(
            info.fingerprint,
            info.holds,
            str(info.n_rows),
            str(info.n_parts),
            f"{info.n_bytes / 2**20:.1f}",
            info.inputs.get("backbone", "?"),
            info.inputs.get("weights", "?")[:40],
            info.inputs.get("input_size", "?"),
        )
    console.print(table)


@cache_app.command("verify")
def cache_verify(config: ConfigOption = DEFAULT_CONFIG, overrides: Overrides = None) -> None:
    """Check schema, one row per hash, finite values and file integrity; exit 1 on problems.

    Warnings (rows repeated across parts, which readers de-duplicate) are printed but pass.
    """
    from emotr.cache.maintenance import verify_cache

    cfg = _load(config, overrides)
    problems = _run_guarded(lambda: verify_cache(cfg.cache.root), cfg)
    for problem in problems:
        errors.print(f"- {problem}", highlight=False)
    n_errors = sum(": warning: " not in problem for problem in problems)
    if n_errors:
        raise _fail(f"{n_errors} problem(s) in cache {cfg.cache.root}")
    console.print(f"cache {cfg.cache.root}: ok ({len(problems)} warning(s))")


@cache_app.command("gc")
def cache_gc(config: ConfigOption = DEFAULT_CONFIG, overrides: Overrides = None) -> None:
    """Delete leftovers of interrupted commits (old _tmp files) and parts proven corrupt.

    A part that cannot be read now (permissions, network) is kept and listed.
    """
    from emotr.cache.maintenance import gc_cache

    cfg = _load(config, overrides)
    result = _run_guarded(lambda: gc_cache(cfg.cache.root), cfg)
    for path in result.removed:
        console.print(f"removed {path}", highlight=False)
    for path, reason in result.skipped:
        errors.print(f"kept {path}: {reason}", markup=False, highlight=False)
    kept = f", {len(result.skipped)} part(s) kept: run gc again later" if result.skipped else ""
    console.print(f"cache {cfg.cache.root}: {len(result.removed)} file(s) removed{kept}")


@cache_app.command("compact")
def cache_compact(config: ConfigOption = DEFAULT_CONFIG, overrides: Overrides = None) -> None:
    """Merge rows repeated across parts (left by two extractions at once) into one per image."""
    from emotr.cache.maintenance import compact_cache

    cfg = _load(config, overrides)
    result = _run_guarded(lambda: compact_cache(cfg.cache.root), cfg)
    for path in result.written:
        console.print(f"wrote {path}", highlight=False)
    for path in result.removed:
        console.print(f"removed {path}", highlight=False)
    console.print(
        f"cache {cfg.cache.root}: {result.n_dropped} repeated row(s) dropped, "
        f"{len(result.written)} part(s) written, {len(result.removed)} removed"
    )


@cache_app.command("export")
def cache_export(
    out: Annotated[Path, typer.Argument(help="Folder for features.npy and sha256.txt.")],
    config: ConfigOption = DEFAULT_CONFIG,
    overrides: Overrides = None,
) -> None:
    """Export the current fingerprint's features as .npy for users who want plain numpy."""
    from emotr.cache.store import compute_fingerprint, export_npy

    cfg = _load(config, overrides)
    fingerprint, _ = compute_fingerprint(cfg.backbone, cfg.decode)
    _run_guarded(lambda: export_npy(cfg.cache.root, fingerprint, str(out)), cfg)
    console.print(f"exported {fingerprint} to {out}")


def main() -> None:  # pragma: no cover - console script shim
    """Entry point for `python -m emotr.cli.main`."""
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
