"""What a listing leaves on an MLflow run: the resolved config, every listed image with its split,
the label conflicts, the cross-split duplicates and the excluded files, their counts and the split
digest.

Shared by the runs that list data (`pipeline`, `extract` alone, `audit`), so it lives below them
all. The run is written through emotr.track's Tracker, which the caller passes in (MLflow is
imported there, never here).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from emotr.config import Config
from emotr.config_io import to_yaml
from emotr.data.listing import Listing

if TYPE_CHECKING:
    from emotr.track import Tracker


def log_listing(tracker: Tracker, run_id: str, cfg: Config, listing: Listing) -> None:
    """Record the resolved config and the listing with its split on a run."""
    tracker.log_text(run_id, to_yaml(cfg), "config.yaml")
    tracker.log_table(run_id, listing.images, "data/listing.csv")
    if len(listing.conflicts):  # every path, where the console warning names a few
        tracker.log_table(run_id, listing.conflicts, "data/conflicts.csv")
    if len(listing.cross_split):
        tracker.log_table(run_id, listing.cross_split, "data/cross_split_duplicates.csv")
    if len(listing.excluded):  # data.exclude: left out of every split
        tracker.log_table(run_id, listing.excluded, "data/excluded.csv")
    splits = listing.images["split"].value_counts()
    tracker.log_metrics(
        run_id,
        {
            "n_listed_images": len(listing.images),
            **{f"n_{name}_images": int(splits.get(name, 0)) for name in ("train", "val", "test")},
            "n_conflict_files": len(listing.conflicts),
            "n_conflict_images": listing.conflicts["sha256"].nunique(),
            "n_excluded_files": len(listing.excluded),
            # Copies of bytes that another split holds too, left out of their (later) split.
            "n_cross_split_duplicates": int((~listing.cross_split["kept"]).sum())
            if len(listing.cross_split)
            else 0,
        },
    )
    tracker.set_tags(
        run_id, {"split_digest": listing.digest, "classes": json.dumps(list(cfg.data.classes))}
    )
