"""`emotr explain`'s work: a registered model's probabilities and class activation maps of image
files, written as overlay PNGs, contact sheets and one CSV row per file.

A Ray Data job through extraction's pipeline, as `emotr predict` (emotr.deploy.predict): read,
hash and decode tasks with the version's decode rules and input size, then actors holding the
version as a CamModel (its backbone's block outputs, its head and the head's gradient), which
hand back K probabilities and one small map (e.g. 7x7 at 224x224) per image. Nothing is taken
from the feature cache: a map needs the block output, which the cache does not hold. The driver
reads each good file once more and decodes it at display size (at most DISPLAY_MAX_SIDE pixels)
for its overlay, so the overlay shows the whole picture, not the backbone's squashed input.
Rows arrive batch by batch in input order and are written as they come.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from emotr.config import Config, DecodeConfig, MlflowConfig
from emotr.data.imageio import DecodeError, decode_image, failure_reason
from emotr.deploy.predict import Predictor
from emotr.deploy.registry import load_model, scorer_of
from emotr.deploy.serving import prediction_frame, probability_columns
from emotr.errors import EmotrError
from emotr.extract.actor import output_column
from emotr.extract.dataset import build_dataset, plan_actors, stream_batches
from emotr.insight.cam import MAP_OUTPUT, PROBA_OUTPUT, CamModel, map_grid
from emotr.insight.overlay import (
    Tile,
    caption_lines,
    display_size,
    overlay,
    png_bytes,
    sheet,
    thumbnail,
)
from emotr.search.metrics import predicted_labels
from emotr.storage import read_bytes
from emotr.track import Tracker

log = logging.getLogger(__name__)

TABLE_FILE = "explanations.csv"
CONTACT_SHEET = "contact_sheet.png"
# Tiles per contact sheet: a page of 32 rows of 8 (about 1.3 MP). More images make more pages
# (contact_sheet_2.png, ...), so the driver holds at most one page of thumbnails.
SHEET_TILES = 256
_NAME_CHARS = 26  # of a file name in a tile's caption: what fits in a tile's width


class ExplainError(EmotrError, ValueError):
    """An output folder that `emotr explain` cannot write; the message names it."""


@dataclass(frozen=True)
class ExplainSummary:
    """What `emotr explain` wrote."""

    n_images: int
    n_failed: int
    n_overlays: int
    table: Path  # explanations.csv
    sheets: tuple[Path, ...]  # contact sheets, none when no image could be read


def check_output_dir(output: Path, inputs: Sequence[str | Path]) -> None:
    """Fail before any work when --output is a file, or a folder inside an input folder."""
    if output.exists() and not output.is_dir():
        raise ExplainError(f"--output {output} is a file; name a folder (it is created)")
    target = output.resolve()
    for item in map(Path, inputs):
        if not item.is_dir():
            continue
        folder = item.resolve()
        if target == folder or folder in target.parents:
            # Its PNGs would be listed as images by the next run on that folder.
            raise ExplainError(
                f"--output {output} lies inside the input folder {item}, and emotr writes "
                "nothing into input data; choose a folder outside it"
            )


def load_cam_model(mlflow: MlflowConfig, uri: str, batch_size: int) -> CamModel:
    """In an actor: the version rebuilt from its own weight files, as a CamModel."""
    scorer = scorer_of(load_model(Tracker(mlflow), uri))
    if hasattr(scorer.extractor, "batch_size"):
        # A fine-tuned version's extractor (block 4 activations) runs the batch job's size.
        scorer.extractor.batch_size = batch_size
    return CamModel(scorer, batch_size)


def explain_paths(
    cfg: Config,
    predictor: Predictor,
    paths: Sequence[str],
    output: Path,
    *,
    progress: bool = True,
    connect: Callable[[], None] | None = None,
) -> ExplainSummary:
    """Explain every path into `output`: an overlay PNG per good image (<stem>_<index>.png),
    contact sheets, and explanations.csv (path, p_<class>..., label, error, overlay)."""
    output.mkdir(parents=True, exist_ok=True)
    writer = _ExplanationWriter(output, predictor.scorer.spec, cfg.explain.alpha, predictor.uri)
    for batch in explain_batches(cfg, predictor, paths, progress=progress, connect=connect):
        writer.add(batch)
    return writer.close()


def explain_batches(
    cfg: Config,
    predictor: Predictor,
    paths: Sequence[str],
    *,
    progress: bool = True,
    connect: Callable[[], None] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """The pipeline's output batches, in input order: path, sha256, ok, reason, height, width
    (of the original), out_proba (n, K) and out_cam (n, gh, gw) raw maps."""
    if not paths:
        return
    if connect is not None:
        connect()
    spec = predictor.scorer.spec
    job = cfg.model_copy(update={"backbone": spec.backbone, "decode": spec.decode})
    todo = pd.DataFrame({"path": list(paths), "sha256": ""})
    loader = functools.partial(
        load_cam_model, predictor.mlflow, predictor.uri, cfg.extract.batch_size
    )
    outputs = {PROBA_OUTPUT: (len(spec.classes),), MAP_OUTPUT: map_grid(spec)}
    dataset = build_dataset(job, todo, loader, plan_actors(cfg.extract), outputs=outputs)
    dataset.context.execution_options.preserve_order = True
    yield from stream_batches(dataset, len(todo), progress, label="explain")


def display_pixels(data: bytes, height: int, width: int, decode: DecodeConfig) -> np.ndarray:
    """An image's bytes decoded at its display size (its shape, at most DISPLAY_MAX_SIDE)."""
    return decode_image(
        data,
        display_size(height, width),
        max_pixels=decode.max_pixels,
        background=tuple(decode.background),
        # Bilinear whatever decode.resize says: an antialiased picture for people; the maps
        # come from the model's own decoding.
        resize="bilinear",
    )


def tile_caption(name: str, classes: Sequence[str], proba: np.ndarray, predicted: int, given=None):
    """A tile's caption: the file's name (cut to a tile's width), then caption_lines."""
    short = name if len(name) <= _NAME_CHARS else name[: _NAME_CHARS - 3] + "..."
    return (short, *caption_lines(classes, proba, predicted, given))


@dataclass
class _ExplanationWriter:
    """Rows to explanations.csv, overlays to PNG files, tiles to contact sheets, batch by batch."""

    output: Path
    spec: Any  # the version's ServingSpec
    alpha: float
    title: str
    n_images: int = 0
    n_failed: int = 0
    n_overlays: int = 0
    tiles: list[Tile] = field(default_factory=list)
    sheets: list[Path] = field(default_factory=list)

    def add(self, batch: dict[str, np.ndarray]) -> None:
        """Write one batch's overlays and rows."""
        classes, n_rows = self.spec.classes, len(batch["path"])
        ok = batch["ok"].astype(bool)
        probabilities = np.full((n_rows, len(classes)), np.nan)
        probabilities[ok] = batch[output_column(PROBA_OUTPUT)][ok]
        errors = [None if good else str(r) for r, good in zip(batch["reason"], ok, strict=True)]
        predicted = np.zeros(n_rows, np.int64)
        if ok.any():
            predicted[ok] = predicted_labels(probabilities[ok], self.spec.threshold)
        overlays = [
            self._write_overlay(batch, row, probabilities[row], int(predicted[row])) if ok[row]
            else ""
            for row in range(n_rows)
        ]  # fmt: skip
        frame = prediction_frame(probabilities, errors, self.spec)
        for k, name in enumerate(probability_columns(classes)):
            frame[name] = probabilities[:, k]  # one float dtype, NaN where there is none
        frame.insert(0, "path", [str(path) for path in batch["path"]])
        frame["overlay"] = overlays
        frame.to_csv(
            self.output / TABLE_FILE,
            mode="a" if self.n_images else "w",
            header=not self.n_images,
            index=False,
        )
        self.n_images += n_rows
        self.n_failed += int((~ok).sum())

    def _write_overlay(self, batch, row: int, proba: np.ndarray, predicted: int) -> str:
        """The overlay's file name (relative to the folder); "" when the file cannot be read
        again as it was (changed or gone since the actor read it)."""
        path = str(batch["path"][row])
        try:
            data = read_bytes(path)
            if hashlib.sha256(data).hexdigest() != batch["sha256"][row]:
                raise DecodeError("file changed since it was explained")
            pixels = display_pixels(
                data, int(batch["height"][row]), int(batch["width"][row]), self.spec.decode
            )
        except (DecodeError, OSError) as error:
            log.warning("no overlay for %s: %s", path, failure_reason(error))
            return ""
        blended = overlay(pixels, batch[output_column(MAP_OUTPUT)][row], self.alpha)
        name = f"{Path(path).stem}_{self.n_images + row}.png"
        (self.output / name).write_bytes(png_bytes(blended))
        self.n_overlays += 1
        caption = tile_caption(Path(path).name, self.spec.classes, proba, predicted)
        self.tiles.append(Tile(thumbnail(blended), caption))
        if len(self.tiles) == SHEET_TILES:
            self._write_sheet()
        return name

    def _write_sheet(self) -> None:
        page = len(self.sheets) + 1
        name = CONTACT_SHEET if page == 1 else CONTACT_SHEET.replace(".png", f"_{page}.png")
        title = f"emotr explain: {self.title}" + (f" (page {page})" if page > 1 else "")
        (self.output / name).write_bytes(sheet(self.tiles, title))
        self.sheets.append(self.output / name)
        self.tiles = []

    def close(self) -> ExplainSummary:
        """Write the last contact sheet (and a header-only table when there were no rows)."""
        if self.tiles:
            self._write_sheet()
        if not self.n_images:
            columns = ["path", *probability_columns(self.spec.classes), "label", "error"]
            pd.DataFrame(columns=[*columns, "overlay"]).to_csv(
                self.output / TABLE_FILE, index=False
            )
        return ExplainSummary(
            self.n_images,
            self.n_failed,
            self.n_overlays,
            self.output / TABLE_FILE,
            tuple(self.sheets),
        )
