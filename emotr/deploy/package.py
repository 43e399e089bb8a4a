"""The deployable model: a trial's head and the backbone packed as one image-in pyfunc model,
logged on the trial's run and registered with its lineage as version tags. An ensemble
(Candidate.members) packs several trials' heads behind one backbone, logged on a run of its own.

It is logged from code (emotr/deploy/serving_model.py) with native Keras `.weights.h5` files and
a JSON spec as artifacts, so loading it unpickles nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.keras
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from PIL import Image

import emotr
from emotr.config import Config
from emotr.deploy.registry import (
    FEATURE_FINGERPRINT_TAG,
    TAPS_FINGERPRINT_TAG,
    TEST_ARTIFACT,
    TEST_SET_TAG,
    VALIDATION_ARTIFACT,
    find_version_of_run,
    fluent_store,
)
from emotr.deploy.serving import (
    BACKBONE_WEIGHTS_ARTIFACT,
    HEAD_WEIGHTS_ARTIFACT,
    SPEC_ARTIFACT,
    HeadSpec,
    ServingSpec,
    member_weights_artifact,
    output_columns,
    probability_columns,
)
from emotr.extract.backbone import save_conv_base_weights
from emotr.extract.fingerprint import features_fingerprint
from emotr.extract.weights import weights_identity
from emotr.hyperparams import HeadParams
from emotr.track import Tracker, pinned, pinned_requirements

_MODEL_NAME_IN_RUN = "deployable"


@dataclass(frozen=True)
class Member:
    """One head of an ensemble: the trial run that logged it as `model`, how to rebuild it."""

    run_id: str  # holds the head as `model` (keras_model_bytes)
    head: HeadParams
    n_features: int
    trial: int


@dataclass(frozen=True)
class Candidate:
    """A trained head to register: its run, how to rebuild it and the data it was chosen on.

    An ensemble has `members` (two or more): run_id is then the run the ensemble's model is
    logged on (not a trial's), head, n_features and trial are its first member's, and val_auc
    the ensemble's own.
    """

    run_id: str  # holds the head as `model` (keras_model_bytes); an ensemble: its own run
    head: HeadParams
    n_features: int
    feature_fingerprint: str
    split_digest: str
    study: str
    trial: int
    val_auc: float
    validation: pd.DataFrame  # path, sha256, label of the validation images
    # path, sha256, label of the test split (never seen by the search); empty: none held out
    test: pd.DataFrame = dataclasses.field(
        default_factory=lambda: pd.DataFrame(columns=["path", "sha256", "label"])
    )
    members: tuple[Member, ...] = ()


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
            name, description="emotr: image bytes -> P(emotion class) (VGG + tuned head)"
        )
    version = find_version_of_run(tracker, name, candidate.run_id)
    if version is None:
        version = _register_new(cfg, tracker, candidate)
    client.set_registered_model_alias(name, cfg.registry.challenger_alias, version.version)
    return client.get_model_version(name, version.version)


def serving_spec(cfg: Config, candidate: Candidate) -> ServingSpec:
    """The spec.json of the candidate's deployable model."""
    return ServingSpec(
        backbone=cfg.backbone.model_copy(update={"weights": _weights_identity(cfg)}),
        decode=cfg.decode,
        head=candidate.head,
        n_features=candidate.n_features,
        classes=tuple(cfg.data.classes),
        activation=cfg.extract.cache_activation if candidate.head.finetune else None,
        members=tuple(HeadSpec(head=m.head, n_features=m.n_features) for m in candidate.members),
    )


def _register_new(cfg: Config, tracker: Tracker, candidate: Candidate) -> ModelVersion:
    spec = serving_spec(cfg, candidate)
    tracker.log_table(candidate.run_id, candidate.validation, VALIDATION_ARTIFACT)
    if len(candidate.test):
        tracker.log_table(candidate.run_id, candidate.test, TEST_ARTIFACT)
    with tempfile.TemporaryDirectory() as folder, fluent_store(tracker):
        artifacts = _write_artifacts(cfg, candidate, spec, Path(folder))
        weights_sha256 = _sha256(Path(artifacts[BACKBONE_WEIGHTS_ARTIFACT]))
        with mlflow.start_run(run_id=candidate.run_id):
            info = mlflow.pyfunc.log_model(
                name=_MODEL_NAME_IN_RUN,
                python_model=str(Path(__file__).with_name("serving_model.py")),
                artifacts=artifacts,
                signature=serving_signature(spec.classes),
                input_example=pd.DataFrame({"image": [_example_jpeg()]}),
                pip_requirements=pinned_requirements() + pinned(("mlflow", "pillow", "pandas")),
            )
        tags = _version_tags(cfg, candidate, spec, weights_sha256)
        # What mlflow.register_model does for a models:/ URI, without its console lines
        # ("Registered model ... already exists. Creating a new version of this model...").
        version = tracker.client.create_model_version(
            cfg.registry.model_name, info.model_uri, tags=tags, model_id=info.model_id
        )
    tracker.client.update_model_version(
        cfg.registry.model_name,
        version.version,
        description=(
            f"{describe_members(candidate)} of study {candidate.study} (run {candidate.run_id}), "
            f"val AUC {candidate.val_auc:.4f}; input: `image` bytes (base64 over REST) or "
            f"`path`; output: {', '.join(output_columns(spec.classes))}"
        ),
    )
    return version


def describe_members(candidate: Candidate) -> str:
    """'trial 7', or 'ensemble of trials 7, 3, 12' (its members' heads averaged)."""
    if not candidate.members:
        return f"trial {candidate.trial}"
    return f"ensemble of trials {', '.join(str(m.trial) for m in candidate.members)}"


def _write_artifacts(cfg: Config, candidate: Candidate, spec: Any, folder: Path) -> dict[str, str]:
    """spec.json and the backbone's and heads' native Keras weight files, by artifact name: the
    head's (head_weights), or each ensemble member's (head_weights_<i>, from its trial's run)."""
    paths = {
        SPEC_ARTIFACT: folder / "spec.json",
        BACKBONE_WEIGHTS_ARTIFACT: folder / "backbone.weights.h5",
    }
    heads = {HEAD_WEIGHTS_ARTIFACT: ("head", candidate.run_id)}
    if candidate.members:
        heads = {
            member_weights_artifact(i): (f"head_{i}", m.run_id)
            for i, m in enumerate(candidate.members)
        }
    # A single head's spec leaves `members` out: emotr before ensembles still loads it.
    excluded = None if candidate.members else {"members"}
    paths[SPEC_ARTIFACT].write_text(spec.model_dump_json(indent=2, exclude=excluded))
    save_conv_base_weights(cfg.backbone, paths[BACKBONE_WEIGHTS_ARTIFACT])
    for name, (stem, run_id) in heads.items():
        paths[name] = folder / f"{stem}.weights.h5"
        mlflow.keras.load_model(f"runs:/{run_id}/model").save_weights(str(paths[name]))
    return {key: str(path) for key, path in paths.items()}


def serving_signature(classes: tuple[str, ...] = ("negative", "positive")) -> Any:
    """`image` (binary; base64 over REST) or `path` in; p_<class> each, label, error out."""
    return ModelSignature(
        inputs=Schema(
            [
                ColSpec("binary", "image", required=False),
                ColSpec("string", "path", required=False),
            ]
        ),
        outputs=Schema(
            [
                *(ColSpec("double", name) for name in probability_columns(classes)),
                ColSpec("string", "label", required=False),
                ColSpec("string", "error", required=False),
            ]
        ),
    )


def _example_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), (128, 96, 64)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _weights_identity(cfg: Config) -> str:
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
        "n_test_images": str(len(candidate.test)),
        "emotr_version": emotr.__version__,
        "git_commit": git_commit(),
    }
    if len(candidate.test):
        tags[TEST_SET_TAG] = f"runs:/{candidate.run_id}/{TEST_ARTIFACT}"
    if candidate.members:
        # No feature_fingerprint: no one cache folder holds what its heads read, so predict
        # and the gate decode the images (one VGG pass gives every member's taps).
        tags["ensemble_trials"] = json.dumps([m.trial for m in candidate.members])
        tags["ensemble_runs"] = json.dumps([m.run_id for m in candidate.members])
        tags["features"] = json.dumps([m.head.features for m in candidate.members])
        # gap5's folder, beside which every member's taps are cached: the gate and the test
        # score read them there instead of decoding (emotr.deploy.promote.score_images).
        tags[TAPS_FINGERPRINT_TAG] = candidate.feature_fingerprint
    elif spec.activation is None:
        tags["features"] = spec.head.features
        # The folder of exactly the head's features (gap5's is the cache's own fingerprint):
        # predict and the gate score cached rows from it. A combination of taps has no such
        # folder: they decode the images instead.
        folder = features_fingerprint(cfg.backbone, cfg.decode, spec.head.features)
        if folder is not None:
            tags[FEATURE_FINGERPRINT_TAG] = folder
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
    return hashlib.sha256(path.read_bytes()).hexdigest()
