"""The audit as an MLflow run named `audit` (`run_audit`, what `emotr audit` runs) and what it
leaves there: the listing, the CSVs with every path, the metrics, the gallery PNG.

The gallery shows the top suspected label issues as thumbnails, each with its given and
suggested label and the self-confidence, so a person can review them in the MLflow UI before
listing the wrong ones in data.exclude.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from emotr.config import Config, DecodeConfig
from emotr.data.imageio import DecodeError, decode_image
from emotr.data.listing import Listing
from emotr.data.listing_report import log_listing
from emotr.insight.audit import Audit, audit_listing
from emotr.search.plots import to_png
from emotr.storage import read_bytes

if TYPE_CHECKING:
    from emotr.track import Tracker

log = logging.getLogger(__name__)

ARTIFACTS = {
    "label_issues": "audit/label_issues.csv",
    "near_duplicates": "audit/near_duplicates.csv",
    "near_blank": "audit/near_blank.csv",
    "out_of_fold": "audit/out_of_fold.csv",
}
GALLERY = "audit/label_issues_gallery.png"
_THUMBNAIL = (128, 128)
_COLUMNS = 8


def run_audit(
    cfg: Config,
    tracker: Tracker,
    listing: Listing,
    before_backbone: Callable[[], None] | None = None,
) -> tuple[str, Audit]:
    """The label audit of the listing's train and val images on their cached features, as an
    MLflow run named `audit`: its id and the audit. In-process, no Ray; `before_backbone` is
    called before Keras loads (only the first audit of a cache runs the backbone). cfg's
    data.classes must be resolved (pipeline.resolve_data)."""
    with tracker.run("audit") as run_id:
        log_listing(tracker, run_id, cfg, listing)
        found = audit_listing(cfg, listing, before_backbone)
        log_audit(tracker, run_id, found, cfg.decode, cfg.audit.gallery_size)
    return run_id, found


def log_audit(
    tracker: Tracker, run_id: str, audit: Audit, decode: DecodeConfig, gallery_size: int
) -> None:
    """Log the audit's tables, metrics and (gallery_size > 0, issues found) gallery on a run."""
    for name, artifact in ARTIFACTS.items():
        tracker.log_table(run_id, getattr(audit, name), artifact)
    tracker.log_metrics(run_id, audit.metrics)
    tracker.set_tags(run_id, {"feature_fingerprint": audit.fingerprint, "features": "gap5"})
    top = audit.label_issues.head(gallery_size)
    if len(top):
        tracker.log_bytes(run_id, gallery_png(top, decode), GALLERY)


def gallery_png(issues: pd.DataFrame, decode: DecodeConfig) -> bytes:
    """The suspects as a grid of thumbnails titled rank, given -> suggested, self-confidence."""
    return to_png(gallery_figure(issues, decode))


def gallery_figure(issues: pd.DataFrame, decode: DecodeConfig) -> Figure:
    """gallery_png's figure (rows of label_issues: rank, path, given, suggested, confidence)."""
    n_columns = min(_COLUMNS, len(issues))
    n_rows = math.ceil(len(issues) / n_columns)
    figure = Figure(figsize=(1.9 * n_columns, 2.25 * n_rows + 0.4), layout="constrained")
    figure.suptitle("Suspected label issues (out-of-fold self-confidence, lowest first)")
    axes = np.atleast_1d(figure.subplots(n_rows, n_columns)).reshape(-1)
    for ax in axes:
        ax.set_axis_off()
    for ax, row in zip(axes, issues.itertuples(index=False), strict=False):
        ax.imshow(_thumbnail(row.path, decode))
        ax.set_title(
            f"#{row.rank} {row.given} → {row.suggested}\nself-confidence {row.self_confidence:.2g}",
            fontsize=8,
        )
    return figure


def _thumbnail(path: str, decode: DecodeConfig) -> np.ndarray:
    """The image as a small RGB array; a grey square where it cannot be read any more."""
    try:
        return decode_image(
            read_bytes(path),
            _THUMBNAIL,
            max_pixels=decode.max_pixels,
            background=decode.background,
            resize=decode.resize,
        )
    except (OSError, DecodeError) as error:  # changed since the listing: the CSVs still name it
        log.warning("audit gallery: %s cannot be shown (%s); a grey square stands in", path, error)
        return np.full((*_THUMBNAIL, 3), 128, np.uint8)
