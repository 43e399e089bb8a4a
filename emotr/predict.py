"""Batch prediction with a registered (image-in) model: files, folders or manifests -> rows.

The model is loaded once and called on bounded chunks of paths, so memory stays flat however many
images there are; rows go to the output file chunk by chunk. Bad files are rows with a reason.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from emotr.config import Config
from emotr.data import IMAGE_EXTENSIONS, MANIFEST_EXTENSIONS
from emotr.errors import EmotrError
from emotr.registry import get_version, load_model, scorer_of
from emotr.storage import read_bytes
from emotr.track import Tracker

OUTPUT_COLUMNS = ("path", "p_positive", "label", "error")
DEFAULT_CHUNK = 64


class PredictError(EmotrError, ValueError):
    """An input or output that prediction cannot use; the message names it."""


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


def load_predictor(cfg: Config, tracker: Tracker, uri: str) -> Any:
    """The pyfunc model at `uri`; a registry URI that names nothing is a RegistryError."""
    if uri.startswith("models:/"):
        name, _, ref = uri.removeprefix("models:/").replace("@", "/").partition("/")
        get_version(tracker, name, ref)  # names the missing alias or version clearly
    return load_model(tracker, uri)


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


@dataclass(frozen=True)
class CachedFeatures:
    """The feature cache of a version's fingerprint: predict takes these images' features."""

    cache: Any  # emotr.cache.FeatureCache
    known: frozenset[str]  # sha256 of the cached images


def open_cached_features(cfg: Config, tracker: Tracker, uri: str) -> CachedFeatures | None:
    """The cache (under cfg.cache.root) holding features of the model's fingerprint, if any."""
    from emotr.cache import FeatureCache

    if not uri.startswith("models:/"):
        return None
    name, _, ref = uri.removeprefix("models:/").replace("@", "/").partition("/")
    fingerprint = get_version(tracker, name, ref).tags.get("feature_fingerprint")
    if not fingerprint:
        return None
    try:
        cache = FeatureCache.open(cfg.cache.root, fingerprint)
        return CachedFeatures(cache, frozenset(cache.cached_hashes()))
    except (EmotrError, OSError, ValueError):  # no such cache here: every image is decoded
        return None


def predict_chunks(
    model: Any,
    paths: Sequence[str],
    chunk: int = DEFAULT_CHUNK,
    cached: CachedFeatures | None = None,
) -> Iterator[pd.DataFrame]:
    """path, p_positive, label, error for each path, `chunk` images per model call.

    With `cached` (and an emotr model), images whose bytes are in the cache are not decoded.
    """
    scorer = scorer_of(model) if cached is not None else None
    for start in range(0, len(paths), chunk):
        part = list(paths[start : start + chunk])
        if scorer is None:
            scored = model.predict(pd.DataFrame({"path": part}))
        else:
            scored = _score_with_cache(scorer, part, cached)
        yield pd.DataFrame(
            {
                "path": part,
                "p_positive": scored["p_positive"].to_numpy(dtype=float),
                "label": scored["label"].where(scored["error"].isna(), None).to_numpy(),
                "error": scored["error"].to_numpy(),
            }
        )


def _score_with_cache(scorer: Any, paths: list[str], cached: CachedFeatures) -> pd.DataFrame:
    """Read each file once: cached bytes take their features, the others are decoded."""
    images: list[bytes | None] = []
    for path in paths:
        try:
            images.append(read_bytes(path))
        except OSError:
            images.append(None)  # the scorer reads the path again and reports why it failed
    hashes = [hashlib.sha256(data).hexdigest() if data is not None else None for data in images]
    hits = [row for row, digest in enumerate(hashes) if digest in cached.known]
    features = cached.cache.load([hashes[row] for row in hits]) if hits else []
    frame = pd.DataFrame(
        {"image": pd.Series(images, dtype=object), "path": pd.Series(paths, dtype=object)}
    )
    return scorer.score(frame, known=dict(zip(hits, features, strict=True)))


def write_predictions(chunks: Iterator[pd.DataFrame], output: Path) -> PredictSummary:
    """Write chunks to a .parquet or .csv file as they come; returns the counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if output.suffix.lower() not in {".parquet", ".csv"}:
        raise PredictError(f"--output {output} must end with .parquet or .csv")
    output.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema(
        [
            ("path", pa.string()),
            ("p_positive", pa.float64()),
            ("label", pa.string()),
            ("error", pa.string()),
        ]
    )
    n_images = n_failed = 0
    writer = pq.ParquetWriter(output, schema) if output.suffix.lower() == ".parquet" else None
    try:
        for index, frame in enumerate(chunks):
            n_images += len(frame)
            n_failed += int(frame["error"].notna().sum())
            if writer is not None:
                writer.write_table(pa.Table.from_pandas(frame, schema, preserve_index=False))
            else:
                frame.to_csv(
                    output, mode="w" if index == 0 else "a", header=index == 0, index=False
                )
    finally:
        if writer is not None:
            writer.close()
    if writer is None and n_images == 0:
        pd.DataFrame(columns=list(OUTPUT_COLUMNS)).to_csv(output, index=False)
    return PredictSummary(n_images, n_failed)
