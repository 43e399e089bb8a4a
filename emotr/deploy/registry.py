"""The deployable model: pack a trial's head, build the image-in model, register it, load it.

A registered version is one MLflow pyfunc model that takes image bytes (or paths) and returns
p_positive, label and error: decode (emotr's rules), resize, VGG16 with its weights and the head.
It is logged from code (emotr/deploy/serving_model.py) with native Keras `.weights.h5` files and a JSON
spec as artifacts, so loading it unpickles nothing. Its version carries the lineage as tags.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

import emotr
from emotr.config import Config, HeadParams
from emotr.errors import EmotrError
from emotr.track import Tracker, pack_dir

# Where the validation images of a version are listed, on its run: the promotion gate's data.
VALIDATION_ARTIFACT = "data/validation.csv"
_MODEL_NAME_IN_RUN = "deployable"


class RegistryError(EmotrError, RuntimeError):
    """A model name, version or alias that does not exist; the message says what to run instead."""


def keras_model_bytes(model: Any, x_example: Any) -> bytes:
    """An MLflow Keras model (with signature) packed by `pack_dir`; runs in workers, no tracking.

    The driver uploads it with `Tracker.log_dir_bytes(run_id, data, "model")`, so that
    `runs:/<run_id>/model` loads with mlflow.pyfunc and registers like a model from log_model.
    """
    import mlflow.keras
    from mlflow.models import infer_signature

    output = model(x_example, training=False)
    signature = infer_signature(x_example, output.numpy() if hasattr(output, "numpy") else output)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model"
        mlflow.keras.save_model(
            model, str(path), signature=signature, pip_requirements=_requirements()
        )
        return pack_dir(path)


def _requirements() -> list[str]:
    # Explicit requirements: inferring them starts a subprocess that loads the model (seconds).
    tf = _pinned(("tensorflow",)) or _pinned(("tensorflow-cpu",))
    return _pinned(("keras",)) + tf


def _pinned(names: tuple[str, ...]) -> list[str]:
    """name==version for each of the packages that is installed."""
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return pins


@dataclass(frozen=True)
class Candidate:
    """A trained head to register: its run, how to rebuild it and the data it was chosen on."""

    run_id: str  # holds the head as `model` (keras_model_bytes)
    head: HeadParams
    n_features: int
    feature_fingerprint: str
    split_digest: str
    study: str
    trial: int
    val_auc: float
    validation: pd.DataFrame  # path, sha256, label of the validation images


def register_model(cfg: Config, tracker: Tracker, candidate: Candidate) -> ModelVersion:
    """Log the deployable model on the candidate's run, register it, point the challenger at it.

    Idempotent: a version already registered from this run is reused (a retried step makes no
    second version).
    """
    client, name = tracker.client, cfg.registry.model_name
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name, description="emotr: image bytes -> P(positive emotion) (VGG16 + tuned head)"
        )
    version = find_version_of_run(tracker, name, candidate.run_id)
    if version is None:
        version = _register_new(cfg, tracker, candidate)
    client.set_registered_model_alias(name, cfg.registry.challenger_alias, version.version)
    return client.get_model_version(name, version.version)


def find_version_of_run(tracker: Tracker, name: str, run_id: str) -> ModelVersion | None:
    """The version of model `name` registered from run_id, if any."""
    versions = tracker.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return min(versions, key=lambda v: int(v.version)) if versions else None


def _register_new(cfg: Config, tracker: Tracker, candidate: Candidate) -> ModelVersion:
    import mlflow

    from emotr.deploy.serving import ServingSpec

    spec = ServingSpec(
        backbone=cfg.backbone.model_copy(update={"weights": _weights_identity(cfg)}),
        decode=cfg.decode,
        head=candidate.head,
        n_features=candidate.n_features,
        classes=tuple(cfg.data.classes),
        activation=cfg.extract.cache_activation if candidate.head.finetune else None,
    )
    tracker.log_table(candidate.run_id, candidate.validation, VALIDATION_ARTIFACT)
    with tempfile.TemporaryDirectory() as folder, _fluent(tracker):
        artifacts = _write_artifacts(cfg, candidate, spec, Path(folder))
        weights_sha256 = _sha256(Path(artifacts["backbone_weights"]))
        with mlflow.start_run(run_id=candidate.run_id):
            info = mlflow.pyfunc.log_model(
                name=_MODEL_NAME_IN_RUN,
                python_model=str(Path(__file__).with_name("serving_model.py")),
                artifacts=artifacts,
                signature=serving_signature(),
                input_example=pd.DataFrame({"image": [_example_jpeg()]}),
                pip_requirements=_requirements() + _pinned(("mlflow", "pillow", "pandas")),
            )
        tags = _version_tags(cfg, candidate, spec, weights_sha256)
        version = mlflow.register_model(info.model_uri, cfg.registry.model_name, tags=tags)
    tracker.client.update_model_version(
        cfg.registry.model_name,
        version.version,
        description=(
            f"trial {candidate.trial} of study {candidate.study} (run {candidate.run_id}), "
            f"val AUC {candidate.val_auc:.4f}; input: `image` bytes (base64 over REST) or "
            "`path`; output: p_positive, label, error"
        ),
    )
    return version


def _write_artifacts(cfg: Config, candidate: Candidate, spec: Any, folder: Path) -> dict[str, str]:
    """spec.json and the backbone's and head's native Keras weight files, by artifact name."""
    import mlflow.keras

    from emotr.extract.backbone import save_conv_base_weights

    paths = {
        "spec": folder / "spec.json",
        "backbone_weights": folder / "backbone.weights.h5",
        "head_weights": folder / "head.weights.h5",
    }
    paths["spec"].write_text(spec.model_dump_json(indent=2))
    save_conv_base_weights(cfg.backbone, paths["backbone_weights"])
    head = mlflow.keras.load_model(f"runs:/{candidate.run_id}/model")
    head.save_weights(str(paths["head_weights"]))
    return {key: str(path) for key, path in paths.items()}


def serving_signature() -> Any:
    """`image` (binary; base64 over REST) or `path` in; p_positive, label, error out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema(
            [
                ColSpec("binary", "image", required=False),
                ColSpec("string", "path", required=False),
            ]
        ),
        outputs=Schema(
            [
                ColSpec("double", "p_positive"),
                ColSpec("string", "label", required=False),
                ColSpec("string", "error", required=False),
            ]
        ),
    )


def _example_jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), (128, 96, 64)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _weights_identity(cfg: Config) -> str:
    from emotr.extract.backbone import weights_identity

    return weights_identity(cfg.backbone)


def _version_tags(
    cfg: Config, candidate: Candidate, spec: Any, weights_sha256: str
) -> dict[str, str]:
    height, width = cfg.backbone.input_size
    tags = {
        "classes": json.dumps(list(cfg.data.classes)),
        "input_size": f"{height}x{width}",
        "backbone": cfg.backbone.name,
        "backbone_weights": spec.backbone.weights,  # an identity (sha256), never a path
        "weights_sha256": weights_sha256,
        "split_digest": candidate.split_digest,
        "study": candidate.study,
        "trial": str(candidate.trial),
        "val_auc": f"{candidate.val_auc:.6f}",
        "validation_set": f"runs:/{candidate.run_id}/{VALIDATION_ARTIFACT}",
        "emotr_version": emotr.__version__,
        "git_commit": git_commit(),
    }
    if spec.activation is None:
        from emotr.cache.store import features_fingerprint

        tags["features"] = spec.head.features
        # The folder of exactly the head's features (gap5's is the cache's own fingerprint):
        # predict and the gate score cached rows from it. A combination of taps has no such
        # folder: they decode the images instead.
        folder = features_fingerprint(cfg.backbone, cfg.decode, spec.head.features)
        if folder is not None:
            tags["feature_fingerprint"] = folder
    else:
        # Not feature_fingerprint: predict and the gate would feed its cached features to a
        # model that takes activations; they decode the images instead.
        tags["activation"] = spec.activation
        tags["activation_fingerprint"] = candidate.feature_fingerprint
    return tags


def git_commit() -> str:
    """The commit of emotr's checkout, or 'unknown' (no git, not a checkout): never fails."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextmanager
def _fluent(tracker: Tracker) -> Iterator[None]:
    """MLflow's fluent API (log_model, models:/ URIs) pointed at this store for the block."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracker.uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def get_version(tracker: Tracker, name: str, version_or_alias: str) -> ModelVersion:
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


def find_version(tracker: Tracker, name: str, alias: str) -> ModelVersion | None:
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


def load_model(tracker: Tracker, uri: str) -> Any:
    """A pyfunc model by URI (models:/name@alias, models:/name/3, runs:/...) from this store."""
    import mlflow.pyfunc

    with _fluent(tracker):
        return mlflow.pyfunc.load_model(uri)


def load_scorer(tracker: Tracker, version: ModelVersion) -> Any:
    """A registered version's emotr.deploy.serving.ImageScorer (to score cached features too)."""
    scorer = scorer_of(load_model(tracker, f"models:/{version.name}/{version.version}"))
    if scorer is None:
        raise RegistryError(
            f"version {version.version} of {version.name!r} is not an image-in emotr model "
            "(registered by an older emotr?); register it again with `emotr run`"
        )
    return scorer


def scorer_of(model: Any) -> Any:
    """The emotr.deploy.serving.ImageScorer inside a loaded pyfunc model, or None for other models."""
    try:
        return getattr(model.unwrap_python_model(), "scorer", None)
    except MlflowException:  # another flavor (no python_model): not emotr's
        return None


def load_validation_set(tracker: Tracker, version: ModelVersion) -> pd.DataFrame:
    """path, sha256, label of the images a version was validated on."""
    import mlflow.artifacts

    uri = version.tags.get("validation_set")
    if not uri:
        raise RegistryError(
            f"version {version.version} of {version.name!r} records no validation set "
            "(registered by an older emotr); pass --data ROOT|MANIFEST"
        )
    with _fluent(tracker):
        text = mlflow.artifacts.load_text(uri)
    return pd.read_csv(io.StringIO(text))
