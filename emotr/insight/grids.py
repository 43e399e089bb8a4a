"""Pictures of a registered version on its MLflow run: its worst validation errors and its most
confident correct validation images of each class, every tile the image with the map of the
predicted class over it, its given label and the predicted probabilities.

Chosen cheaply: the version's scorer scores the validation images on the cached features of its
fingerprint (decoding them only when the cache does not hold them: a combination of taps, a
fine-tuned version); then only the chosen images (at most explain.grid_size per grid) are
decoded and run through CamModel, so that the pictures are of the registered model itself.
`emotr run` calls log_explain_grids after registering its challenger; a picture never fails it.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from emotr.config import Config
from emotr.data.imageio import DecodeError, decode_image_with_size, failure_reason
from emotr.deploy.registry import load_scorer, version_features
from emotr.deploy.serving import probability_columns
from emotr.insight.cam import CamModel
from emotr.insight.explain import display_pixels, tile_caption
from emotr.insight.overlay import Tile, overlay, sheet
from emotr.search.metrics import predicted_labels
from emotr.storage import read_bytes
from emotr.track import Tracker

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

WORST_ERRORS = "explain/worst_errors.png"
_CHUNK = 64  # images per scorer call when the validation images must be decoded


@dataclass(frozen=True)
class GridChoice:
    """One grid: its artifact file, its title and the validation rows it shows, in order."""

    artifact: str
    title: str
    rows: np.ndarray  # positions in the validation frame


@dataclass(frozen=True)
class _Explained:
    pixels: np.ndarray  # the image at display size
    proba: np.ndarray
    predicted: int
    raw_map: np.ndarray


def confident_artifact(name: str) -> str:
    """The artifact file of a class's grid of its most confident correct images."""
    return f"explain/confident_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.png"


def log_explain_grids(
    cfg: Config, tracker: Tracker, version: ModelVersion, validation: pd.DataFrame
) -> list[str]:
    """Log the grids (PNG) on the version's run; the artifact files logged.

    validation: path, sha256, label of the images the version was validated on. Never raises:
    grids that cannot be made are a warning that says why (the model is registered already).
    """
    if cfg.explain.grid_size == 0 or not len(validation):
        return []
    if "ensemble_trials" in version.tags:  # several heads average: no one map explains them
        log.info("explain grids: none for an ensemble; `emotr explain` a member trial's version")
        return []
    try:
        return _log_grids(cfg, tracker, version, validation.reset_index(drop=True))
    except Exception as error:  # a picture must not fail the run that registered the model
        log.warning(
            "explain grids not logged on run %s: %s: %s",
            version.run_id,
            type(error).__name__,
            error,
        )
        return []


def _log_grids(
    cfg: Config, tracker: Tracker, version: ModelVersion, validation: pd.DataFrame
) -> list[str]:
    scorer = load_scorer(tracker, version)
    spec = scorer.spec
    proba = validation_scores(cfg, scorer, version, validation)
    labels = validation["label"].to_numpy(np.int64)
    choices = choose_images(proba, labels, spec.threshold, cfg.explain.grid_size, spec.classes)
    wanted = sorted({int(row) for choice in choices for row in choice.rows})
    explained = _explain_rows(scorer, validation, wanted, cfg.extract.batch_size)
    logged = []
    for choice in choices:
        tiles = [
            _tile(explained[row], validation.iloc[row], spec.classes, cfg.explain.alpha)
            for row in map(int, choice.rows)
            if row in explained
        ]
        if tiles:
            tracker.log_bytes(version.run_id, sheet(tiles, choice.title), choice.artifact)
            logged.append(choice.artifact)
    log.info("explain grids on run %s: %s", version.run_id, ", ".join(logged) or "none")
    return logged


def validation_scores(
    cfg: Config, scorer: Any, version: ModelVersion, images: pd.DataFrame
) -> np.ndarray:
    """(n, K) probabilities of the images by the version's scorer: on the cached features of its
    fingerprint when the cache holds them all, else decoded (NaN where a file cannot be)."""
    cached = version_features(cfg.cache.root, version)
    hashes = images["sha256"].tolist()
    if cached is not None and set(hashes) <= cached.known:
        return scorer.score_features(cached.cache.load(hashes))
    columns, paths = probability_columns(scorer.spec.classes), images["path"].tolist()
    chunks = [
        scorer.score(pd.DataFrame({"path": paths[start : start + _CHUNK]}))[columns]
        for start in range(0, len(paths), _CHUNK)
    ]
    return np.concatenate([c.to_numpy(dtype=np.float64, na_value=np.nan) for c in chunks])


def choose_images(
    proba: np.ndarray,
    labels: np.ndarray,
    threshold: float,
    size: int,
    classes: Sequence[str],
) -> list[GridChoice]:
    """The worst errors (misclassified, highest log loss first) and, per class, the most
    confident correct images (highest probability of their class first), at most `size` each."""
    scored = np.isfinite(proba).all(axis=1)
    predicted = np.full(len(labels), -1)
    if scored.any():
        predicted[scored] = predicted_labels(proba[scored], threshold)
    given = np.clip(proba[np.arange(len(labels)), labels], 1e-12, 1.0)
    loss = np.where(scored, -np.log(given), -np.inf)
    wrong = np.flatnonzero(scored & (predicted != labels))
    worst = wrong[np.argsort(-loss[wrong], kind="stable")][:size]
    choices = [
        GridChoice(
            WORST_ERRORS,
            f"worst validation errors (highest loss): {len(worst)} of {len(wrong)}",
            worst,
        )
    ]
    for k, name in enumerate(classes):
        right = np.flatnonzero(scored & (predicted == k) & (labels == k))
        top = right[np.argsort(-proba[right, k], kind="stable")][:size]
        title = f"most confident correct '{name}' validation images: {len(top)} of {len(right)}"
        choices.append(GridChoice(confident_artifact(name), title, top))
    return choices


def _explain_rows(
    scorer: Any, images: pd.DataFrame, rows: Sequence[int], batch_size: int
) -> dict[int, _Explained]:
    """The maps of the chosen rows by CamModel; a file that cannot be decoded is skipped."""
    spec, decode = scorer.spec, scorer.spec.decode
    kept, inputs, shown = [], [], []
    for row in rows:
        path, expected = str(images["path"][row]), str(images["sha256"][row])
        try:
            data = read_bytes(path)
            if hashlib.sha256(data).hexdigest() != expected:
                raise DecodeError("file changed since it was listed")
            decoded = decode_image_with_size(
                data,
                tuple(spec.backbone.input_size),
                max_pixels=decode.max_pixels,
                background=tuple(decode.background),
                resize=decode.resize,
            )
            shown.append(display_pixels(data, decoded.height, decoded.width, decode))
        except (DecodeError, OSError) as error:
            log.warning("explain grids: skipped %s: %s", path, failure_reason(error))
            continue
        kept.append(row)
        inputs.append(decoded.pixels)
    if not kept:
        return {}
    result = CamModel(scorer, batch_size).explain(np.stack(inputs))
    return {
        row: _Explained(shown[i], result.proba[i], int(result.predicted[i]), result.maps[i])
        for i, row in enumerate(kept)
    }


def _tile(explained: _Explained, image: pd.Series, classes: Sequence[str], alpha: float) -> Tile:
    caption = tile_caption(
        Path(str(image["path"])).name,
        classes,
        explained.proba,
        explained.predicted,
        int(image["label"]),
    )
    return Tile(overlay(explained.pixels, explained.raw_map, alpha), caption)
