"""The deployable model: pack a trial's head as an MLflow model, register it, move aliases, load it.

A registered version is the head (512 features -> P(positive)). The backbone and decode settings
that made its features travel with it as version tags: `emotr predict` rebuilds the same extractor.
"""

from __future__ import annotations

import importlib.metadata
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from emotr.config import BackboneConfig, Config, DecodeConfig
from emotr.errors import EmotrError
from emotr.track import Tracker, pack_dir


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
    # Explicit requirements: inferring them starts a subprocess that loads the model (seconds).
    requirements = _pinned(("keras",)) + (_pinned(("tensorflow",)) or _pinned(("tensorflow-cpu",)))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model"
        mlflow.keras.save_model(
            model, str(path), signature=signature, pip_requirements=requirements
        )
        return pack_dir(path)


def _pinned(names: tuple[str, ...]) -> list[str]:
    """name==version for each of the packages that is installed."""
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return pins


def register_model(cfg: Config, tracker: Tracker, run_id: str) -> ModelVersion:
    """Register the head logged by `run_id` and point the candidate alias at the new version."""
    client, name = tracker.client, cfg.registry.model_name
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name, description="emotr head: VGG16 GAP features -> P(positive emotion)"
        )
    run = client.get_run(run_id)
    version = client.create_model_version(
        name,
        source=f"{run.info.artifact_uri}/model",
        run_id=run_id,
        tags={
            "backbone": cfg.backbone.model_dump_json(),
            "decode": cfg.decode.model_dump_json(),
            "classes": json.dumps(list(cfg.data.classes)),
            "val_auc": str(run.data.metrics.get("val_auc", "")),
        },
    )
    client.set_registered_model_alias(name, cfg.registry.candidate_alias, version.version)
    return version


def promote_model(cfg: Config, tracker: Tracker, version: str | None = None) -> ModelVersion:
    """Point the champion alias at `version` (default: the candidate) and return that version."""
    client, name = tracker.client, cfg.registry.model_name
    target = get_version(tracker, name, version or cfg.registry.candidate_alias)
    client.set_registered_model_alias(name, cfg.registry.champion_alias, target.version)
    return target


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


@dataclass
class DeployedModel:
    """A registered head with the extractor settings that its features need."""

    version: ModelVersion
    head: Any  # mlflow.pyfunc.PyFuncModel
    backbone: BackboneConfig
    decode: DecodeConfig
    classes: tuple[str, str]


def load_deployed(tracker: Tracker, name: str, version_or_alias: str) -> DeployedModel:
    """Load a registered version's head and its backbone/decode settings."""
    version = get_version(tracker, name, version_or_alias)
    uri = f"models:/{name}/{version.version}"
    head = _load_pyfunc(tracker, uri)
    return DeployedModel(
        version=version,
        head=head,
        backbone=BackboneConfig.model_validate_json(version.tags["backbone"]),
        decode=DecodeConfig.model_validate_json(version.tags["decode"]),
        classes=tuple(json.loads(version.tags["classes"])),
    )


def _load_pyfunc(tracker: Tracker, uri: str) -> Any:
    # models:/ URIs resolve through the global registry URI; point it at this store for the load.
    import mlflow
    import mlflow.pyfunc

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracker.uri)
    try:
        return mlflow.pyfunc.load_model(uri)
    finally:
        mlflow.set_tracking_uri(previous)
