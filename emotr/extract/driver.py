"""The extraction driver: images not cached yet -> the Ray Data dataset (emotr.extract.dataset:
read, hash, decode -> VGG16 features on extractor actors) -> commits to the Parquet cache.

Files the listing index does not know are hashed by the task that reads them (the driver never
reads an image): one whose bytes turn out to be cached (a renamed file) is not decoded, and the
driver completes the Listing from the hashes the tasks hand back (emotr.data.index.Scan).

The driver is the cache's only writer: Ray may run a task twice (retries, restarted actors), but
rows are keyed by content hash and the driver skips hashes it has committed, so the cache never
holds a row twice. A killed driver loses at most the rows it had not committed; the next run
extracts only what is missing. This module never calls ray.init: the CLI or the test does.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from emotr.cache.fingerprint import CacheKey
from emotr.cache.sets import CacheSet, open_cache_set
from emotr.config import Config
from emotr.data.imageio import hash_keys
from emotr.data.index import Scan
from emotr.data.listing import Listing
from emotr.errors import EmotrError
from emotr.extract.actor import ModelLoader, output_column
from emotr.extract.backbone import FeatureExtractor, output_shape
from emotr.extract.dataset import build_dataset, plan_actors, stream_batches
from emotr.extract.fingerprint import cache_key
from emotr.extract.weights import check_weights
from emotr.taps import DEFAULT_TAP, conv_passes

log = logging.getLogger(__name__)

FAILURE_COLUMNS = ["path", "sha256", "reason"]


@dataclass
class ExtractSummary:
    """What one extraction did: counts, the failures, timings and the completed listing."""

    fingerprint: str
    n_images: int
    n_unique: int
    n_cached: int
    n_extracted: int
    n_failed: int
    failures: pd.DataFrame  # path, sha256, reason
    wall_seconds: float
    images_per_second: float
    rows_per_worker: dict[str, int] = field(default_factory=dict)
    n_actors: int = 0  # extractor actors started (0 when everything was cached)
    # Until the first features reached the driver: actor start, TF import, model load, tracing.
    startup_seconds: float = 0.0
    # The completed listing: every hash known, including those the workers learned.
    listing: Listing | None = None
    # What this run computed (taps, views such as gap5_view3, the activation; none when all
    # was cached) and the passes of the conv base that took per extracted image.
    outputs: tuple[str, ...] = ()
    n_passes: int = 0

    @property
    def passes_per_second(self) -> float:
        """Passes of the conv base per second: images/s times the passes per image."""
        return self.images_per_second * self.n_passes


class TooManyFailures(EmotrError, RuntimeError):
    """More undecodable images than extract.max_failure_fraction allows (good ones are cached)."""

    def __init__(self, summary: ExtractSummary, max_fraction: float):
        self.summary = summary
        examples = "; ".join(
            f"{row.path}: {row.reason}" for row in summary.failures.head(3).itertuples()
        )
        super().__init__(
            f"{summary.n_failed} of {summary.n_unique} images could not be decoded "
            f"({summary.n_failed / max(summary.n_unique, 1):.1%}), more than "
            f"extract.max_failure_fraction={max_fraction}; the {summary.n_extracted} good ones "
            f"are cached. Fix or remove the bad files, or raise extract.max_failure_fraction. "
            f"First failures: {examples}"
        )


class _Committer:
    """Collects the actors' output on the driver and commits every `every` good rows."""

    def __init__(self, cache: CacheSet, every: int, outputs: tuple[str, ...] = (DEFAULT_TAP,)):
        self.cache, self.every, self.outputs = cache, every, tuple(outputs)
        self.pending: list[dict[str, np.ndarray]] = []
        self.n_pending = self.n_committed = 0
        self.failures: list[tuple[str, str, str]] = []
        self.learned: dict[str, str] = {}  # path -> sha256 of every file read, good or bad
        self.workers: Counter[str] = Counter()
        self.n_seen = 0  # rows handed over, good or failed (a retried row may come twice)
        self.found_cached: set[str] = set()  # paths read, hashed and found cached: not decoded

    def add(self, batch: dict[str, np.ndarray]) -> None:
        ok = batch["ok"].astype(bool)
        failed = ~ok & ~batch["cached"].astype(bool)
        self.n_seen += len(ok)
        self.workers.update(str(worker) for worker in batch["worker"])
        self.found_cached.update(str(path) for path in batch["path"][batch["cached"].astype(bool)])
        self.learned.update(
            (str(path), str(key)) for path, key in zip(batch["path"], batch["sha256"], strict=True)
        )
        self.failures += zip(
            batch["path"][failed], batch["sha256"][failed], batch["reason"][failed], strict=True
        )
        columns = ["sha256", "height", "width", *map(output_column, self.outputs)]
        good = {key: batch[key][ok] for key in columns}
        self.pending.append(good)
        self.n_pending += int(ok.sum())
        while self.n_pending >= self.every:
            self.flush(self.every)

    def flush(self, n_rows: int | None = None) -> None:
        if not self.n_pending:
            return
        rows = {key: np.concatenate([p[key] for p in self.pending]) for key in self.pending[0]}
        n_rows = n_rows or len(rows["sha256"])
        self.n_committed += self.cache.commit(
            [str(key) for key in rows["sha256"][:n_rows]],
            {name: rows[output_column(name)][:n_rows] for name in self.outputs},
            rows["height"][:n_rows].tolist(),
            rows["width"][:n_rows].tolist(),
        )
        self.pending = [{key: value[n_rows:] for key, value in rows.items()}]
        self.n_pending -= n_rows


def _consume(
    dataset, committer: _Committer, n_todo: int, progress: bool, n_passes: int = 1
) -> float | None:
    """Commit the dataset's output; returns when (perf_counter) the first rows arrived."""
    first_rows_at = None
    batches = stream_batches(dataset, n_todo, progress, n_passes=n_passes)
    try:
        for batch in batches:
            first_rows_at = first_rows_at or time.perf_counter()
            committer.add(batch)
    finally:  # keep what was extracted, even when the job fails half-way
        batches.close()
        committer.flush()
    return first_rows_at


def plan_extraction(
    cfg: Config, listing: Listing | Scan, key: CacheKey | None = None
) -> tuple[CacheSet, pa.Array, pd.DataFrame]:
    """The caches, the hashes all of them hold, and what to extract: path, sha256 ("" = read
    to know). Each configured tap, each view of one (extract.views) and the activation has its
    cache; an image one of them lacks is extracted (once, for all it lacks). `key`: the job's
    cache key, if computed already.

    Nothing to extract (an empty frame) means a run would start neither Ray nor a model.
    """
    key = key or cache_key(cfg.cache, cfg.backbone, cfg.decode)
    cache = open_cache_set(
        key,
        cfg.extract.taps,
        cfg.extract.cache_activation,
        cfg.backbone.input_size,
        cfg.extract.views,
    )
    cached = cache.complete_hashes()
    known = listing.images[["path", "sha256"]] if isinstance(listing, Listing) else listing.known()
    unique = known.drop_duplicates("sha256")
    unknown = listing.unknown() if isinstance(listing, Scan) else known.iloc[:0, :1]
    # Arrow's is_in on the cache's Arrow column: half the time of a Python set and pandas isin.
    hashes = pa.array(unique["sha256"].to_numpy(), pa.string())
    held = pc.is_in(hashes, value_set=cached).to_numpy(zero_copy_only=False)
    todo = pd.concat([unique[~held], unknown.assign(sha256="")], ignore_index=True)
    return cache, cached, todo


def extract_features(
    cfg: Config,
    listing: Listing | Scan,
    *,
    progress: bool = True,
    load_model: ModelLoader | None = None,
    connect: Callable[[], None] | None = None,
    planned: tuple[CacheSet, pa.Array, pd.DataFrame] | None = None,
) -> ExtractSummary:
    """Extract and cache features of the listing's images that the cache does not hold yet.

    A Scan's files of unknown hash are read and hashed by the pipeline's tasks; the completed
    Listing is `summary.listing`. `load_model` (default: the configured FeatureExtractor) lets
    tests and benchmarks swap the model; it must produce the features the fingerprint
    describes. `connect` is called before the first use of Ray, only when there is work.
    `progress` shows Ray Data's live bars in a terminal and logs a line every 30 s or 10 %
    elsewhere. `planned` is plan_extraction(cfg, listing) when the caller has it already.
    """
    start = time.perf_counter()
    # The plan lists every cache part and compares 100k hashes: ~0.15 s a warm run pays once.
    cache, cached_before, todo = planned or plan_extraction(cfg, listing)
    fingerprint = cache.fingerprint
    unknown = todo[todo["sha256"] == ""]
    outputs = cache.missing_outputs(set(todo["sha256"]) - {""}, unknown=len(unknown) > 0)
    committer = _Committer(cache, cfg.extract.commit_every, tuple(outputs))
    plan, startup, n_passes = None, 0.0, conv_passes(outputs)
    if len(todo):
        if connect is not None:
            connect()
        if load_model is None:
            check_weights(cfg.backbone)
            load_model = functools.partial(
                FeatureExtractor, cfg.backbone, batch_size=cfg.extract.batch_size, outputs=outputs
            )
        plan = plan_actors(cfg.extract)
        log.info(
            "%s (passes of the conv base per image: %d) with %d actors into %s",
            _work_line(outputs, len(todo) - len(unknown), len(unknown)),
            n_passes,
            plan.n_actors,
            fingerprint,
        )
        # Only files of unknown hash may turn out cached (renamed or copied ones).
        skip = hash_keys(cached_before.to_pylist()) if len(unknown) else None
        first_rows_at = _consume(
            build_dataset(cfg, todo, load_model, plan, skip, _shapes(cfg, outputs)),
            committer,
            len(todo),
            progress,
            n_passes,
        )
        # Until the first features reached the driver: actor start, imports, model load, tracing.
        startup = first_rows_at - start if first_rows_at else 0.0
    if isinstance(listing, Scan):
        listing = listing.complete(committer.learned)
    summary = _summarize(
        listing, cached_before, committer, fingerprint, time.perf_counter() - start
    )
    summary.n_actors, summary.startup_seconds = (plan.n_actors if plan else 0), startup
    if plan is not None:
        summary.outputs, summary.n_passes = tuple(outputs), n_passes
        log.info("%s", _done_line(outputs, summary, len(unknown), len(committer.found_cached)))
    if summary.n_failed > cfg.extract.max_failure_fraction * summary.n_unique:
        raise TooManyFailures(summary, cfg.extract.max_failure_fraction)
    if summary.n_failed:
        first = summary.failures.iloc[0]
        log.warning(
            "%d of %d images could not be decoded and are left out; first: %s: %s",
            summary.n_failed,
            summary.n_unique,
            first["path"],
            first["reason"],
        )
    return summary


def _work_line(outputs: list[str], n_new: int, n_unknown: int) -> str:
    """What the run is about to do. Files of unknown hash are read and hashed first; only those
    whose bytes the cache lacks go on to the backbone, so their count is known only at the end."""
    what = "+".join(outputs)
    if not n_unknown:
        return f"extracting {what} of {n_new} images"
    new = f"{n_new} new images and of " if n_new else ""
    return (
        f"reading {n_unknown} files of unknown hash (the cached ones are skipped, not decoded), "
        f"extracting {what} of {new}those the cache lacks"
    )


def _done_line(
    outputs: list[str], summary: ExtractSummary, n_unknown: int, n_found_cached: int
) -> str:
    """What the run did: the images that really went through the backbone."""
    line = (
        f"extracted {'+'.join(outputs)} of {summary.n_extracted} images "
        f"({summary.n_failed} failed) in {summary.wall_seconds:.1f} s"
    )
    if n_unknown:
        line += f"; {n_found_cached} of the {n_unknown} files of unknown hash were cached already"
    return line


def _shapes(cfg: Config, outputs: list[str]) -> dict[str, tuple[int, ...]]:
    return {name: output_shape(cfg.backbone, name) for name in outputs}


def _summarize(
    listing: Listing,
    cached_before: pa.Array,
    committer: _Committer,
    fingerprint: str,
    wall: float,
) -> ExtractSummary:
    # A retried task may hand the same failure over twice; an image fails once. A file that
    # could not be read has no hash: its path names it.
    failures = pd.DataFrame(committer.failures, columns=FAILURE_COLUMNS)
    failures = failures.assign(
        key=failures["sha256"].where(failures["sha256"] != "", failures["path"])
    )
    failures = failures.drop_duplicates("key").drop(columns="key").reset_index(drop=True)
    unique = pa.array(listing.images["sha256"].to_numpy(), pa.string()).unique()
    n_unreadable = int((failures["sha256"] == "").sum())
    return ExtractSummary(
        fingerprint=fingerprint,
        n_images=len(listing.images),
        n_unique=len(unique) + n_unreadable,
        n_cached=pc.sum(pc.is_in(unique, value_set=cached_before)).as_py() or 0,
        n_extracted=committer.n_committed,
        n_failed=len(failures),
        failures=failures,
        wall_seconds=wall,
        images_per_second=committer.n_committed / wall if wall > 0 else 0.0,
        rows_per_worker=dict(committer.workers),
        listing=listing,
    )
