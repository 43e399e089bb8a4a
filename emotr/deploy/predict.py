"""Batch prediction with a registered (image-in) model: files, folders or manifests -> rows.

`emotr predict` runs as a Ray Data job through extraction's own pipeline (emotr.extract.dataset:
read, hash, decode in bounded batches -> extractor actors running the version: its backbone, then
its head), so a batch job decodes exactly as extraction and serving do. Images whose bytes are in
the feature cache of the version's fingerprint are hashed but not decoded: the driver scores their
cached features. Rows stream to the output file batch by batch, in input order; a bad file is a
row with its reason.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from emotr.config import Config, MlflowConfig
from emotr.data.imageio import hash_keys
from emotr.data.listing import IMAGE_EXTENSIONS
from emotr.data.manifest import MANIFEST_EXTENSIONS
from emotr.deploy.registry import (
    CachedFeatures,
    get_version,
    load_model,
    scorer_of,
    version_features,
)
from emotr.deploy.serving import output_columns, prediction_frame, probability_columns
from emotr.errors import EmotrError
from emotr.extract.actor import output_column
from emotr.extract.dataset import build_dataset, plan_actors, stream_batches
from emotr.taps import DEFAULT_TAP
from emotr.track import Tracker

DEFAULT_CHUNK = 64
# Rows per Parquet row group of --output: a few hundred KB, however small the batches are.
_ROW_GROUP = 4096


class PredictError(EmotrError, ValueError):
    """An input, output or model that prediction cannot use; the message names it."""


@dataclass(frozen=True)
class PredictSummary:
    """Counts of a batch prediction."""

    n_images: int
    n_failed: int


def model_uri(cfg: Config, model: str | None) -> str:
    """A models:/ URI from --model: a URI as given, else a version number or an alias."""
    name = cfg.registry.model_name
    if model is None:
        return f"models:/{name}@{cfg.registry.champion_alias}"
    if ":/" in model:
        return model
    return f"models:/{name}/{model}" if model.isdigit() else f"models:/{name}@{model}"


def resolve_uri(tracker: Tracker, uri: str) -> str:
    """models:/NAME@ALIAS -> models:/NAME/N; a registry URI that names nothing is a RegistryError.

    The actors load the version the driver resolved, even if the alias moves meanwhile.
    """
    if not uri.startswith("models:/"):
        return uri
    name, _, ref = uri.removeprefix("models:/").replace("@", "/").partition("/")
    version = get_version(tracker, name, ref)  # names the missing alias or version clearly
    return f"models:/{name}/{version.version}"


def load_predictor(cfg: Config, tracker: Tracker, uri: str) -> Any:
    """The pyfunc model at `uri`; a registry URI that names nothing is a RegistryError."""
    return load_model(tracker, resolve_uri(tracker, uri))


def list_inputs(items: Sequence[str | Path]) -> list[str]:
    """Image paths from files, folders (every image below, sorted) and manifests (`path`)."""
    paths: list[str] = []
    for item in map(Path, items):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            paths += [str(p) for p in found if p.is_file()]
        elif item.suffix.lower() in MANIFEST_EXTENSIONS:
            paths += _manifest_paths(item)
        else:
            paths.append(str(item))  # a missing file becomes a row with its reason
    return paths


def _manifest_paths(manifest: Path) -> list[str]:
    table = pd.read_csv(manifest) if manifest.suffix == ".csv" else pd.read_parquet(manifest)
    if "path" not in table:
        raise PredictError(f"manifest {manifest} has no `path` column; found {list(table)}")
    # Relative paths in a manifest are relative to the manifest's folder, as in data.manifest.
    return [str(p if Path(p).is_absolute() else manifest.parent / p) for p in table["path"]]


def open_cached_features(cfg: Config, tracker: Tracker, uri: str) -> CachedFeatures | None:
    """The cache (under cfg.cache.root) holding features of the model's fingerprint, if any."""
    if not uri.startswith("models:/"):
        return None
    name, _, ref = uri.removeprefix("models:/").replace("@", "/").partition("/")
    return version_features(cfg.cache.root, get_version(tracker, name, ref))


@dataclass(frozen=True)
class Predictor:
    """A registered emotr version loaded on the driver, ready for a batch job."""

    uri: str  # models:/NAME/N (resolved) or another URI MLflow loads
    scorer: Any  # emotr.deploy.serving.ImageScorer: its head scores the features
    cached: CachedFeatures | None
    mlflow: MlflowConfig  # the tracking URI made absolute: the actors load the model from it


def open_predictor(cfg: Config, tracker: Tracker, uri: str) -> Predictor:
    """Load the version at `uri` and open the feature cache of its fingerprint (if any)."""
    uri = resolve_uri(tracker, uri)
    scorer = scorer_of(load_model(tracker, uri))
    if scorer is None:
        # A pyfunc of another kind has no head on 512 features nor decode rules to run in
        # the pipeline; the head-only models of emotr before issue 8 are of that kind.
        raise PredictError(
            f"{uri} is not an image-in emotr model (registered by an older emotr, or not by "
            "emotr); register one with `emotr run`, or call it with mlflow.pyfunc yourself"
        )
    mlflow = cfg.mlflow.model_copy(update={"tracking_uri": tracker.uri})
    return Predictor(uri, scorer, open_cached_features(cfg, tracker, uri), mlflow)


class VersionScores:
    """pixels -> (n, K) class probabilities: a version's extractor, then its head.

    What an extractor actor of predict's job runs. The head runs in the actor, right after the
    backbone, so that K numbers per image travel to the driver whatever the extractor gives:
    512 gap5 features, a combination of taps, or the block-4 activations (400 KB per image at
    224x224) that a fine-tuned version's own block 5 consumes.
    """

    def __init__(self, scorer: Any):
        self.scorer = scorer

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """Class probabilities of a batch of decoded images, one row each."""
        features = self.scorer.extractor(pixels)
        return self.scorer.score_features(features).astype(np.float32)


def load_version_scores(mlflow: MlflowConfig, uri: str, batch_size: int) -> VersionScores:
    """In an extractor actor: the version rebuilt from its own weight files, as VersionScores.

    Loaded from the tracking server like any model (`models:/`), so it works on every node of a
    cluster, not only where the driver downloaded the artifacts.
    """
    scorer = scorer_of(load_model(Tracker(mlflow), uri))
    if hasattr(scorer.extractor, "batch_size"):
        # Serving pads every request to a small batch; a batch job runs extraction's size.
        scorer.extractor.batch_size = batch_size
    return VersionScores(scorer)


def predict_paths(
    cfg: Config,
    predictor: Predictor,
    paths: Sequence[str],
    *,
    progress: bool = True,
    connect: Callable[[], None] | None = None,
) -> Iterator[pd.DataFrame]:
    """path, p_<class>..., label, error for each path, in input order, one frame per batch.

    A Ray Data job: extraction's pipeline (emotr.extract.dataset.build_dataset) reads, hashes and
    decodes each file once with the version's decode rules and input size; its extractor actors
    run the version (VersionScores). `connect` is called before the first use of Ray.
    """
    if not paths:
        return
    if connect is not None:
        connect()
    spec = predictor.scorer.spec
    job = cfg.model_copy(update={"backbone": spec.backbone, "decode": spec.decode})
    todo = pd.DataFrame({"path": list(paths), "sha256": ""})  # hashed where each file is read
    cached = predictor.cached
    skip = hash_keys(cached.known) if cached is not None and cached.known else None
    loader = functools.partial(
        load_version_scores, predictor.mlflow, predictor.uri, cfg.extract.batch_size
    )
    # The actors' model gives one probability per class and image.
    outputs = {DEFAULT_TAP: (len(spec.classes),)}
    dataset = build_dataset(job, todo, loader, plan_actors(cfg.extract), skip, outputs=outputs)
    # Rows in the order of the inputs; Ray Data still streams, holding back only blocks that
    # finish ahead of an earlier one.
    dataset.context.execution_options.preserve_order = True
    for batch in stream_batches(dataset, len(todo), progress, label="predict"):
        yield score_batch(predictor, batch)


def score_batch(predictor: Predictor, batch: dict[str, np.ndarray]) -> pd.DataFrame:
    """Rows of one pipeline batch: the actors' probabilities, the head on cached features (on
    the driver, which holds the same version), else the reason the file could not be used."""
    scorer, n_rows = predictor.scorer, len(batch["path"])
    ok, cached = batch["ok"].astype(bool), batch["cached"].astype(bool)
    probabilities = np.full((n_rows, len(scorer.spec.classes)), np.nan)
    probabilities[ok] = batch[output_column(DEFAULT_TAP)][ok]
    if cached.any():
        hashes = [str(digest) for digest in batch["sha256"][cached]]
        probabilities[cached] = scorer.score_features(predictor.cached.cache.load(hashes))
    good = ok | cached
    errors = [
        None if keep else str(reason) for reason, keep in zip(batch["reason"], good, strict=True)
    ]
    frame = prediction_frame(probabilities, errors, scorer.spec)
    # A file's rows keep one float dtype (NaN where there is none): what Parquet and CSV want.
    for k, name in enumerate(probability_columns(scorer.spec.classes)):
        frame[name] = probabilities[:, k]
    frame.insert(0, "path", pd.Series([str(path) for path in batch["path"]], dtype=object))
    return frame


def predict_chunks(
    model: Any, paths: Sequence[str], chunk: int = DEFAULT_CHUNK
) -> Iterator[pd.DataFrame]:
    """path, p_<class>..., label, error for each path, `chunk` paths per pyfunc call, in process.

    For a notebook or a test with a loaded model and a few images; `emotr predict` runs
    `predict_paths` (a Ray Data job).
    """
    for start in range(0, len(paths), chunk):
        part = list(paths[start : start + chunk])
        scored = model.predict(pd.DataFrame({"path": part}))
        columns = {"path": part}
        for name in scored.columns:
            if name.startswith("p_"):
                columns[name] = scored[name].to_numpy(dtype=float)
        columns["label"] = scored["label"].where(scored["error"].isna(), None).to_numpy()
        columns["error"] = scored["error"].to_numpy()
        yield pd.DataFrame(columns)


def check_output(output: Path) -> None:
    """Fail before any work when --output names a format predict cannot write."""
    if output.suffix.lower() not in {".parquet", ".csv"}:
        raise PredictError(f"--output {output} must end with .parquet or .csv")


def write_predictions(
    chunks: Iterator[pd.DataFrame], output: Path, classes: Sequence[str] = ("negative", "positive")
) -> PredictSummary:
    """Write chunks (path, p_<class> per class, label, error) to a .parquet or .csv file as they
    come; returns the counts."""
    check_output(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema(
        [
            ("path", pa.string()),
            *((name, pa.float64()) for name in probability_columns(classes)),
            ("label", pa.string()),
            ("error", pa.string()),
        ]
    )
    n_images = n_failed = 0
    writer = pq.ParquetWriter(output, schema) if output.suffix.lower() == ".parquet" else None
    pending: list[pd.DataFrame] = []  # Parquet: a row group per _ROW_GROUP rows, not per batch
    try:
        for index, frame in enumerate(chunks):
            n_images += len(frame)
            n_failed += int(frame["error"].notna().sum())
            if writer is None:
                frame.to_csv(
                    output, mode="w" if index == 0 else "a", header=index == 0, index=False
                )
                continue
            pending.append(frame)
            if sum(map(len, pending)) >= _ROW_GROUP:
                writer.write_table(_arrow(pending, schema))
                pending = []
        if writer is not None and pending:
            writer.write_table(_arrow(pending, schema))
    finally:
        if writer is not None:
            writer.close()
    if writer is None and n_images == 0:
        pd.DataFrame(columns=["path", *output_columns(classes)]).to_csv(output, index=False)
    return PredictSummary(n_images, n_failed)


def _arrow(frames: list[pd.DataFrame], schema: Any) -> Any:

    return pa.Table.from_pandas(pd.concat(frames, ignore_index=True), schema, preserve_index=False)
