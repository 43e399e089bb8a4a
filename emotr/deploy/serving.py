"""The deployable classifier's compute: image bytes or paths -> decode -> VGG -> head -> rows.

`ImageScorer` is built from native Keras weight files and a JSON spec by emotr's own builders
(`backbone.build_extractor`, `head.build_head`): loading a model version unpickles nothing. The
MLflow wrapper that serves it is emotr/deploy/serving_model.py; this module knows nothing of
MLflow, and nothing of the training data (the models' graphs only).
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

from emotr.config import BackboneConfig, DecodeConfig
from emotr.data.imageio import DecodeError, decode_image, failure_reason
from emotr.hyperparams import HeadParams
from emotr.storage import read_bytes

# Input columns: one of them per row. `image` is binary (base64 strings over REST, decoded by
# MLflow's scoring server); `path` is a local path or a URI emotr.storage can read.
IMAGE_COLUMN = "image"
PATH_COLUMN = "path"
# Output columns: p_<class> for each class (p_negative, p_positive by default), label, error.
PROBABILITY_PREFIX = "p_"
# The artifacts of a logged deployable model, by name (emotr.deploy.package writes them).
SPEC_ARTIFACT = "spec"
BACKBONE_WEIGHTS_ARTIFACT = "backbone_weights"
HEAD_WEIGHTS_ARTIFACT = "head_weights"
# Images per VGG16 forward pass when serving: small, as a request is often one image and every
# batch is padded to this size.
SERVING_BATCH = 8


class ServingSpec(BaseModel):
    """What rebuilds a deployable model from its weight files (stored as spec.json)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: BackboneConfig  # weights = the identity of the source weights, for reading only
    decode: DecodeConfig
    head: HeadParams
    n_features: int
    classes: tuple[str, ...]  # index = label; two: a sigmoid head, more: a softmax
    threshold: float = 0.5  # two classes: P(class 1) from which the label is class 1
    # A fine-tuned model (head.finetune) starts from this activation, e.g. block4_pool: the head
    # weights file then holds the fine-tuned blocks above it too (emotr.search.finetune).
    activation: str | None = None


def output_columns(classes: Sequence[str]) -> list[str]:
    """The columns a model of `classes` answers with: p_<class> each, label, error."""
    return [*probability_columns(classes), "label", "error"]


def probability_columns(classes: Sequence[str]) -> list[str]:
    """p_<class> for each class, in label order."""
    return [f"{PROBABILITY_PREFIX}{name}" for name in classes]


class ImageScorer:
    """Loads the backbone and head once; `score(frame)` -> p_<class>..., label, error per row."""

    def __init__(self, spec: ServingSpec, backbone_weights: str | Path, head_weights: str | Path):
        # The models' graphs import Keras: only a loaded scorer pays for it, never `emotr
        # predict`'s argument checks nor a reader of the spec.
        from emotr.extract.backbone import features_extractor
        from emotr.search.finetune_model import serving_parts
        from emotr.search.head import build_head

        self.spec = spec
        backbone = spec.backbone.model_copy(update={"weights": str(backbone_weights)})
        if spec.activation is not None:  # `features` are then activations
            self.extractor, self.head = serving_parts(
                spec.head, backbone, spec.activation, SERVING_BATCH, len(spec.classes)
            )
        else:
            # The taps the head was trained on, combined as in training (emotr.taps).
            self.extractor = features_extractor(backbone, spec.head.features, SERVING_BATCH)
            # Normalization needs data to build; the loaded weights replace what it adapts to.
            placeholder = np.zeros((2, spec.n_features), dtype=np.float32)
            self.head = build_head(spec.head, spec.n_features, placeholder, len(spec.classes))
        self.head.load_weights(str(head_weights))

    def score_features(self, features: np.ndarray) -> np.ndarray:
        """(n, K) class probabilities of cached features (the gate skips decoding with these)."""
        from emotr.search.head import predict_proba

        if len(features) == 0:
            return np.zeros((0, len(self.spec.classes)), dtype=np.float64)
        return predict_proba(self.head, np.asarray(features, dtype=np.float32))

    def score(
        self, frame: pd.DataFrame, known: Mapping[int, np.ndarray] | None = None
    ) -> pd.DataFrame:
        """One output row per input row; a row that cannot be read or decoded has probabilities
        and label None and the reason in `error` (None on good rows).

        known: features of some rows (by position), e.g. from the feature cache: not decoded.
        """
        n_rows, known = len(frame), known or {}
        images = frame[IMAGE_COLUMN].tolist() if IMAGE_COLUMN in frame else [None] * n_rows
        paths = frame[PATH_COLUMN].tolist() if PATH_COLUMN in frame else [None] * n_rows
        errors: list[str | None] = [None] * n_rows
        pixels, decoded_rows = [], []
        for row, (image, path) in enumerate(zip(images, paths, strict=True)):
            if row in known:
                continue
            try:
                pixels.append(self._decode(_input_bytes(image, path)))
            except (DecodeError, OSError) as error:
                errors[row] = failure_reason(error)
                continue
            decoded_rows.append(row)
        probabilities = np.full((n_rows, len(self.spec.classes)), np.nan)
        if pixels:
            probabilities[decoded_rows] = self.score_features(self.extractor(np.stack(pixels)))
        if known:
            rows = sorted(known)
            probabilities[rows] = self.score_features(np.stack([known[row] for row in rows]))
        return prediction_frame(probabilities, errors, self.spec)

    def _decode(self, data: bytes) -> np.ndarray:
        decode = self.spec.decode
        return decode_image(
            data,
            tuple(self.spec.backbone.input_size),
            max_pixels=decode.max_pixels,
            background=tuple(decode.background),
            resize=decode.resize,
        )


def prediction_frame(
    probabilities: np.ndarray, errors: list[str | None], spec: ServingSpec
) -> pd.DataFrame:
    """p_<class> for each class, label and error per row, from (n, K) probabilities; the label is
    class 1 where its probability reaches spec.threshold (two classes), else the most probable
    class. Probabilities and label are None where `error` says why the row has none."""
    from emotr.search.metrics import predicted_labels  # scikit-learn: only when scoring

    good = np.array([error is None for error in errors], dtype=bool)
    predicted = np.zeros(len(errors), dtype=np.int64)
    if good.any():
        predicted[good] = predicted_labels(probabilities[good], spec.threshold)
    labels = [spec.classes[k] if ok else None for k, ok in zip(predicted, good, strict=True)]
    # Object columns holding None: pandas would store NaN (float, or its str dtype), which
    # MLflow's scoring server writes as a bare NaN, not JSON; None is written as null.
    columns: dict[str, list] = {
        name: [float(p) if ok else None for p, ok in zip(probabilities[:, k], good, strict=True)]
        for k, name in enumerate(probability_columns(spec.classes))
    }
    columns |= {"label": labels, "error": errors}
    return pd.DataFrame({name: pd.Series(values, dtype=object) for name, values in columns.items()})


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _input_bytes(image: Any, path: Any) -> bytes:
    """A row's image bytes: the `image` value (bytes, or base64 text) else the file at `path`."""
    if not _missing(image):
        if isinstance(image, bytes | bytearray | memoryview):
            return bytes(image)
        if isinstance(image, str):
            try:
                return base64.b64decode(image, validate=False)
            except (binascii.Error, ValueError):
                raise DecodeError("not an image: the image column is not base64") from None
        raise DecodeError(f"not an image: the image column holds a {type(image).__name__}")
    if not _missing(path):
        return read_bytes(str(path))
    raise DecodeError(f"empty row: give the {IMAGE_COLUMN} bytes or a {PATH_COLUMN}")
