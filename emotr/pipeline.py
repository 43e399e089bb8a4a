"""The lifecycle verbs that the CLI and jobs call: prepare data, extract, tune, run them all.

Each verb takes the validated Config and hands each room the sub-config (or the job's cache
key, computed once) it needs; the caller (emotr.cli) has already connected to Ray, or, for
`extract`, passes how to connect when there is work. The search and the registry (Optuna, Ray,
MLflow, Keras) are imported by the verbs that use them, so that a warm `emotr extract` loads none.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from emotr.cache.activations import ActivationCache, open_activation_cache
from emotr.cache.fingerprint import CacheKey
from emotr.config import Config
from emotr.config_io import to_yaml
from emotr.data.demo import (
    DEMO_CLASSES,
    generate_demo_dataset,
    is_complete_demo_root,
    is_demo_root,
)
from emotr.data.index import Scan, scan_images
from emotr.data.listing import Listing, resolve_classes
from emotr.data.listing_report import log_listing
from emotr.extract.driver import ExtractSummary, TooManyFailures, extract_features, plan_extraction
from emotr.extract.fingerprint import cache_key
from emotr.search.finetune_set import load_finetune_set, may_finetune
from emotr.search.training_set import load_feature_set
from emotr.storage import is_uri

if TYPE_CHECKING:
    import pandas as pd

    from emotr.insight.audit import Audit
    from emotr.search.training_set import FeatureSet
    from emotr.track import Tracker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    """What `emotr run` reports at its end."""

    pipeline_run_id: str
    best_val_auc: float
    baseline: str  # the tutorial recipe's val AUC, or that it failed and where to look
    best_trial_number: int
    model_name: str
    model_version: str
    n_images: int
    n_failed: int
    promotion: str | None = None  # the gate's decision and why; None with auto_promote off
    # The registered version on the test split (TestScore.describe), or why there is none.
    test: str = ""
    peer: str = ""  # the plain peer's validation number (FixedTrial.text), "" without one
    test_peer: str = ""  # the peer on the same test images, "" without one
    chosen: str = ""  # what was registered: "trial 7" or "ensemble of trials 7, 3, 12"
    best_val_auc_std: float | None = None  # spread of the best trial's fold AUCs


def resolve_data(cfg: Config) -> Config:
    """cfg with data.classes known, as every later step reads it: the demo set generated first
    when configured and absent, then, for data.classes null, the classes inferred from the root's
    folders (or the manifest's label names), sorted. Cheap: one listing of folder names."""
    if cfg.data.generate_demo and cfg.data.manifest is None:
        ensure_demo_data(cfg)
    data = resolve_classes(cfg.data)
    return cfg if data is cfg.data else cfg.model_copy(update={"data": data})


def prepare_listing(cfg: Config) -> Listing:
    """List the data set with every hash (the listing index spares reading unchanged files)."""
    return prepare_scan(cfg).complete_here()


def prepare_scan(cfg: Config) -> Scan:
    """List the data set from metadata and the listing index, generating the demo set first
    when configured and absent; files of unknown hash are left for the extraction to read."""
    cfg = resolve_data(cfg)
    return scan_images(cfg.data, cfg.cache.root)


def ensure_demo_data(cfg: Config) -> None:
    """Write the synthetic demo set into data.root when that folder is new or empty.

    A root holding anything emotr did not make is the user's data: it is used as it is and
    nothing is written into it. Object-store roots are never written to either.
    """
    root = Path(cfg.data.root)
    if is_uri(cfg.data.root) or is_complete_demo_root(root):
        return
    if root.exists() and not is_demo_root(root) and (not root.is_dir() or any(root.iterdir())):
        log.warning(
            "data.generate_demo is on, but data.root %s already holds files emotr did not make: "
            "using them as they are and writing nothing there (the demo set is generated only "
            "into a new or empty folder)",
            root,
        )
        return
    summary = generate_demo_dataset(
        root,
        n=cfg.data.demo_n,
        size=cfg.data.demo_size,
        seed=cfg.data.seed,
        classes=cfg.data.classes or DEMO_CLASSES,
    )
    log.info(
        "demo data set: %d images in %s; Bayes ceiling accuracy %.3f, AUC %.3f",
        summary.n_images,
        root,
        summary.bayes_accuracy,
        summary.bayes_auc,
    )


def idle_extraction(cfg: Config, scan: Scan) -> ExtractSummary | None:
    """The summary of an extraction with nothing to do, or None when there is work.

    Nothing to do (every file's hash known from the index and cached) starts neither Ray nor a
    model, and opens no MLflow run: a warm re-run costs the listing alone.
    """
    planned = plan_extraction(cfg, scan)
    if len(planned[2]):
        return None
    return extract_features(cfg, scan, planned=planned)


def extract(
    cfg: Config,
    tracker: Tracker,
    listing: Listing | Scan,
    parent_run_id: str | None = None,
    connect: Callable[[], None] | None = None,
    key: CacheKey | None = None,
) -> ExtractSummary:
    """Extract the listing's missing features into the cache, as an MLflow run named `extract`.

    The run holds the fingerprint's inputs as params, the config, the counts and speeds as
    metrics and failures.csv; it is FAILED, with all of these, when too many images fail.
    A Scan is completed by the extraction (`summary.listing`); `connect` starts Ray, called
    only when there is something to extract. `key`: the job's cache key, if computed already.
    """
    cfg = resolve_data(cfg)
    key = key or cache_key(cfg.cache, cfg.backbone, cfg.decode)
    fingerprint, inputs = key.fingerprint, dict(key.inputs)
    with tracker.run("extract", parent_run_id, tags={"fingerprint": fingerprint}) as run_id:
        params = {
            **inputs,
            "fingerprint": fingerprint,
            "extract.n_actors": cfg.extract.n_actors,
            "extract.batch_size": cfg.extract.batch_size,
        }
        tracker.log_params(run_id, params)
        tracker.log_text(run_id, to_yaml(cfg), "config.yaml")
        try:
            planned = plan_extraction(cfg, listing, key)
            summary = extract_features(cfg, listing, connect=connect, planned=planned)
        except TooManyFailures as error:
            _log_extraction(tracker, run_id, cfg, error.summary, parent_run_id)
            raise
        _log_extraction(tracker, run_id, cfg, summary, parent_run_id)
    return summary


def _log_extraction(
    tracker: Tracker,
    run_id: str,
    cfg: Config,
    summary: ExtractSummary,
    parent_run_id: str | None,
) -> None:
    # The listing is complete only now: hashes of new files came from the extraction.
    if parent_run_id is None and summary.listing is not None:
        log_listing(tracker, run_id, cfg, summary.listing)  # `emotr extract` alone
    log_extract_summary(tracker, run_id, summary)


def log_extract_summary(tracker: Tracker, run_id: str, summary: ExtractSummary) -> None:
    """Record an extraction's counts and speeds as metrics and its failures as failures.csv."""
    metrics = {
        "n_images": summary.n_images,
        "n_unique": summary.n_unique,
        "n_extracted": summary.n_extracted,
        "n_cached": summary.n_cached,
        "n_failed": summary.n_failed,
        "n_actors": summary.n_actors,
        "images_per_second": summary.images_per_second,
        "wall_seconds": summary.wall_seconds,
        "startup_seconds": summary.startup_seconds,
    }
    tracker.log_metrics(run_id, metrics)
    tracker.log_table(run_id, summary.failures, "failures.csv")


def audit(
    cfg: Config,
    tracker: Tracker,
    listing: Listing,
    before_backbone: Callable[[], None] | None = None,
) -> tuple[str, Audit]:
    """The label audit of the listing's train and val images on their cached features, as an
    MLflow run named `audit`: its id and the audit (emotr.insight.audit_report.run_audit)."""
    from emotr.insight.audit_report import run_audit

    return run_audit(resolve_data(cfg), tracker, listing, before_backbone)


def tune(cfg: Config, tracker: Tracker, listing: Listing):
    """Search heads on the listing's cached features (an EmotrError names what is not cached)."""
    from emotr.search.study import check_storage
    from emotr.search.tune import run_search

    check_storage(cfg.tune)
    cfg = resolve_data(cfg)
    key = cache_key(cfg.cache, cfg.backbone, cfg.decode)
    features = load_feature_set(
        cfg.cache.root, cfg.tune, listing, key.fingerprint, n_views=cfg.extract.views
    )
    return run_search(cfg, with_activations(cfg, key, listing, features), tracker)


def with_activations(
    cfg: Config, key: CacheKey, listing: Listing, features: FeatureSet
) -> FeatureSet:
    """The features, plus the cached activations when a trial may fine-tune."""
    if not may_finetune(cfg.tune):
        return features
    activation = cfg.extract.cache_activation
    return load_finetune_set(key, cfg.backbone, activation, listing, features)


def load_activations(cfg: Config, sha256s: Sequence[str]) -> np.ndarray:
    """Cached activations (n, h, w, c) float32 of the images `sha256s`, in that order.

    Which activation: extract.cache_activation (block4_pool if unset), for cfg's backbone and
    decode settings; raises ActivationsMissing, saying how to cache them, when some are not.
    """
    name = cfg.extract.cache_activation or "block4_pool"
    key = cache_key(cfg.cache, cfg.backbone, cfg.decode)
    return open_activation_cache(key, name, cfg.backbone.input_size).load(sha256s)


def activation_cache(cfg: Config) -> ActivationCache:
    """The cache of extract.cache_activation beside cfg's features (an error when unset)."""
    key = cache_key(cfg.cache, cfg.backbone, cfg.decode)
    return open_activation_cache(key, cfg.extract.cache_activation, cfg.backbone.input_size)


def run(cfg: Config, tracker: Tracker, listing: Listing | Scan) -> RunResult:
    """Extract, tune and register the best head, all nested under one `pipeline` run; then the
    promotion gate (registry.auto_promote) decides whether it becomes the champion."""
    from emotr.deploy.challenger import (
        choose_candidate,
        run_gate,
        score_fixed_trials,
        score_registered,
    )
    from emotr.deploy.package import describe_members, register_model
    from emotr.insight.grids import log_explain_grids
    from emotr.search.study import check_storage
    from emotr.search.tune import run_search

    check_storage(cfg.tune)  # before the extraction, not after an hour of it
    cfg = resolve_data(cfg)
    key = cache_key(cfg.cache, cfg.backbone, cfg.decode)  # once: it hashes the weights file
    with tracker.run("pipeline") as run_id:
        summary = extract(cfg, tracker, listing, run_id, key=key)
        assert summary.listing is not None
        log_listing(tracker, run_id, cfg, summary.listing)
        features = load_feature_set(
            cfg.cache.root,
            cfg.tune,
            summary.listing,
            summary.fingerprint,
            failed=summary.failures["sha256"],
            n_views=cfg.extract.views,
        )
        features = with_activations(cfg, key, summary.listing, features)
        search = run_search(cfg, features, tracker, run_id)
        validation = _usable(summary.listing.val(), summary)
        test_images = _usable(summary.listing.test(), summary)
        candidate = choose_candidate(cfg, tracker, search, features, validation, test_images)
        version = register_model(cfg, tracker, candidate)
        # Pictures of the challenger on its run (search.best_run_id); never fails the run.
        log_explain_grids(cfg, tracker, version, candidate.validation)
        test = score_registered(cfg, tracker, run_id, version, test_images)
        test_peer = score_fixed_trials(cfg, tracker, run_id, search, test_images, features)
        promotion = run_gate(cfg, tracker)
        metrics = {"best_val_auc": search.best_value, "registered_val_auc": candidate.val_auc}
        if search.best_value_std is not None:
            metrics["best_val_auc_std"] = search.best_value_std
        # The registered model's fold spread: the best trial's, or the ensemble run's own.
        spread = tracker.client.get_run(candidate.run_id).data.metrics.get("val_auc_std")
        if spread is not None:
            metrics["registered_val_auc_std"] = spread
        if search.baseline_value is not None:  # a failed baseline is a tag of the tune run
            metrics["baseline_val_auc"] = search.baseline_value
        tracker.log_metrics(run_id, metrics)
        tags = {"model_version": version.version, "registered": describe_members(candidate)}
        tracker.set_tags(run_id, tags)
        if promotion is not None:
            tracker.set_tags(run_id, {"promotion": promotion})
    return RunResult(
        pipeline_run_id=run_id,
        best_val_auc=search.best_value,
        baseline=search.baseline_text(),
        best_trial_number=search.best_trial_number,
        model_name=cfg.registry.model_name,
        model_version=str(version.version),
        n_images=summary.n_images,
        n_failed=summary.n_failed,
        promotion=promotion,
        test=test,
        peer=search.peer.text() if search.peer is not None else "",
        test_peer=test_peer,
        chosen=describe_members(candidate),
        best_val_auc_std=search.best_value_std,
    )


def _usable(images: pd.DataFrame, summary: ExtractSummary) -> pd.DataFrame:
    """path, sha256, label of the images whose features the extraction has (not failed)."""
    from emotr.deploy.candidates import usable_images

    return usable_images(images, summary.failures["sha256"])
