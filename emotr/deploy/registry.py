"""The Model Registry's side of emotr: find versions, point aliases, load models, read lineage.

A registered version is one MLflow pyfunc model that takes image bytes (or paths) and returns
p_<class> for each class, label and error (emotr.deploy.serving); emotr.deploy.package builds
and registers it.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import mlflow
import mlflow.artifacts
import mlflow.pyfunc
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from emotr.cache.store import FeatureCache
from emotr.config import MlflowConfig
from emotr.errors import EmotrError
from emotr.track import Tracker, tracking_uri

# Where the validation images of a version are listed, on its run.
VALIDATION_ARTIFACT = "data/validation.csv"
# Where its test images are listed (the split the search never read): the promotion gate's data,
# and the version tag naming them (absent when data.test_fraction was 0, or for older versions).
TEST_ARTIFACT = "data/test.csv"
TEST_SET_TAG = "test_set"
# The version tag naming the cache folder of exactly the features its head reads (absent for
# a combination of taps and for fine-tuned models: those decode the images instead).
FEATURE_FINGERPRINT_TAG = "feature_fingerprint"
# An ensemble version: gap5's cache folder, beside which its members' taps are cached.
TAPS_FINGERPRINT_TAG = "taps_fingerprint"


class RegistryError(EmotrError, RuntimeError):
    """A model name, version or alias that does not exist; the message says what to run instead."""


@dataclass(frozen=True)
class RegistryReader:
    """The registry of one tracking store, read only: what a serving replica needs of a
    Tracker (its `uri` and `client`), without creating an experiment."""

    uri: str
    client: MlflowClient


def open_registry(cfg: MlflowConfig) -> RegistryReader:
    """A RegistryReader of the tracking store `cfg` names (a local SQLite path made absolute)."""
    uri = tracking_uri(cfg)
    return RegistryReader(uri, MlflowClient(tracking_uri=uri))


@dataclass(frozen=True)
class CachedFeatures:
    """The feature cache of a version's fingerprint, and the images it holds."""

    cache: FeatureCache
    known: frozenset[str]  # sha256 of the cached images


def version_features(root: str, version: ModelVersion) -> CachedFeatures | None:
    """The cache under `root` holding the features the version's head reads, if there is one."""
    fingerprint = version.tags.get(FEATURE_FINGERPRINT_TAG)
    if not fingerprint:
        return None
    try:
        cache = FeatureCache.open(root, fingerprint)
        return CachedFeatures(cache, frozenset(cache.cached_hashes()))
    except (EmotrError, OSError, ValueError):  # no such cache here: every image is decoded
        return None


def find_version_of_run(tracker: Tracker, name: str, run_id: str) -> ModelVersion | None:
    """The version of model `name` registered from run_id, if any."""
    versions = tracker.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return min(versions, key=lambda v: int(v.version)) if versions else None


def get_version(
    tracker: Tracker | RegistryReader, name: str, version_or_alias: str
) -> ModelVersion:
    """A model version by number or alias, with a clear error when it does not exist."""
    client = tracker.client
    try:
        if version_or_alias.isdigit():
            return client.get_model_version(name, version_or_alias)
        return client.get_model_version_by_alias(name, version_or_alias)
    except MlflowException:
        raise RegistryError(
            f"model {name!r} has no version or alias {version_or_alias!r}; "
            f"run `emotr run` to register one, or list versions in the MLflow UI (make ui)"
        ) from None


def find_version(tracker: Tracker | RegistryReader, name: str, alias: str) -> ModelVersion | None:
    """The version an alias points at, or None when the alias is not set."""
    try:
        return tracker.client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def set_alias(tracker: Tracker, name: str, alias: str, version: str) -> None:
    """Point `alias` of model `name` at `version`."""
    tracker.client.set_registered_model_alias(name, alias, version)


def tag_version(tracker: Tracker, version: ModelVersion, tags: dict[str, str]) -> None:
    """Set tags on a model version (e.g. a promotion decision)."""
    for key, value in tags.items():
        tracker.client.set_model_version_tag(version.name, version.version, key, value)


def load_model(tracker: Tracker | RegistryReader, uri: str) -> Any:
    """A pyfunc model by URI (models:/name@alias, models:/name/3, runs:/...) from this store."""
    with fluent_store(tracker):
        return mlflow.pyfunc.load_model(uri)


def load_scorer(tracker: Tracker | RegistryReader, version: ModelVersion) -> Any:
    """A registered version's emotr.deploy.serving.ImageScorer (to score cached features too)."""
    scorer = scorer_of(load_model(tracker, f"models:/{version.name}/{version.version}"))
    if scorer is None:
        raise RegistryError(
            f"version {version.version} of {version.name!r} is not an image-in emotr model "
            "(registered by an older emotr?); register it again with `emotr run`"
        )
    return scorer


def scorer_of(model: Any) -> Any:
    """The emotr.deploy.serving.ImageScorer inside a loaded pyfunc model; None for other models."""
    try:
        return getattr(model.unwrap_python_model(), "scorer", None)
    except MlflowException:  # another flavor (no python_model): not emotr's
        return None


def version_classes(version: ModelVersion) -> tuple[str, ...]:
    """The class names a version answers, in label order (its `classes` tag); versions
    registered before K classes were negative, positive."""
    return tuple(json.loads(version.tags.get("classes", '["negative", "positive"]')))


def load_validation_set(tracker: Tracker, version: ModelVersion) -> pd.DataFrame:
    """path, sha256, label of the images a version was validated on (its trial chose on them)."""
    uri = version.tags.get("validation_set")
    if not uri:
        raise RegistryError(
            f"version {version.version} of {version.name!r} records no validation set "
            "(registered by an older emotr); pass --data ROOT|MANIFEST"
        )
    return _load_images(tracker, uri)


def load_evaluation_set(tracker: Tracker, version: ModelVersion) -> tuple[pd.DataFrame, str]:
    """path, sha256, label of the images a version is judged on, and which split they are:
    its test split (never seen by its search), else its validation split (data.test_fraction 0,
    or a version registered before test splits)."""
    uri = version.tags.get(TEST_SET_TAG)
    if uri:
        return _load_images(tracker, uri), "test"
    return load_validation_set(tracker, version), "validation"


def _load_images(tracker: Tracker, uri: str) -> pd.DataFrame:
    with fluent_store(tracker):
        text = mlflow.artifacts.load_text(uri)
    return pd.read_csv(io.StringIO(text))


@contextmanager
def fluent_store(tracker: Tracker | RegistryReader) -> Iterator[None]:
    """MLflow's fluent API (log_model, models:/ URIs) pointed at this store for the block."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracker.uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
