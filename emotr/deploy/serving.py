"""The deployable classifier's compute: image bytes or paths -> decode -> VGG -> head -> rows.

An ensemble (ServingSpec.members) runs several heads behind one VGG pass: the extractor emits the
union of the members' taps, each member combines its own `features` from them, and the answer is
the mean of the members' class probabilities.

`ImageScorer` is built from native Keras weight files and a JSON spec by emotr's own builders
(`backbone.build_extractor`, `head.build_head`): loading a model version unpickles nothing. The
MLflow wrapper that serves it is emotr/deploy/serving_model.py; this module knows nothing of
MLflow, and nothing of the training data (the models' graphs only).
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, model_validator

from emotr.config import BackboneConfig, DecodeConfig
from emotr.data.imageio import DecodedImage, DecodeError, decode_image_with_size, failure_reason
from emotr.hardware import machine_bfloat16, run_precision
from emotr.hyperparams import HeadParams
from emotr.storage import read_bytes
from emotr.taps import combine_features, parse_tap, taps_of

log = logging.getLogger(__name__)

# Input columns: one of them per row. `image` is binary (base64 strings over REST, decoded by
# MLflow's scoring server); `path` is a local path or a URI emotr.storage can read.
IMAGE_COLUMN = "image"
PATH_COLUMN = "path"
# Output columns: p_<class> for each class (p_negative, p_positive by default), label, error.
PROBABILITY_PREFIX = "p_"
# The artifacts of a logged deployable model, by name (emotr.deploy.package writes them).
SPEC_ARTIFACT = "spec"
BACKBONE_WEIGHTS_ARTIFACT = "backbone_weights"
HEAD_WEIGHTS_ARTIFACT = "head_weights"  # an ensemble's: member_weights_artifact(i) each
# Images per VGG16 forward pass when serving: small, as a request is often one image and every
# batch is padded to this size.
SERVING_BATCH = 8


def member_weights_artifact(index: int) -> str:
    """The artifact name of an ensemble member's head weights: head_weights_<index>."""
    return f"{HEAD_WEIGHTS_ARTIFACT}_{index}"


class HeadSpec(BaseModel):
    """One head of an ensemble: its hyperparameters (features included) and input length."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    head: HeadParams
    n_features: int


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
    # An ensemble: these heads, their class probabilities averaged (head and n_features are then
    # the first member's). Empty: the one head above (every version registered before issue 27).
    members: tuple[HeadSpec, ...] = ()

    @model_validator(mode="after")
    def _members_fit(self) -> ServingSpec:
        if not self.members:
            return self
        if self.activation is not None or any(m.head.finetune for m in self.members):
            raise ValueError(
                "an ensemble's members read cached feature taps: fine-tuned heads "
                "(activation, head.finetune) cannot be members"
            )
        first = self.members[0]
        if (self.head, self.n_features) != (first.head, first.n_features):
            raise ValueError("an ensemble's head and n_features must be its first member's")
        return self

    @property
    def taps(self) -> tuple[str, ...]:
        """The feature taps the model reads from one VGG pass, each once, in order of first use
        (an ensemble: over its members in order)."""
        heads = [m.head for m in self.members] or [self.head]
        return tuple(dict.fromkeys(tap for head in heads for tap in taps_of(head.features)))


def output_columns(classes: Sequence[str]) -> list[str]:
    """The columns a model of `classes` answers with: p_<class> each, label, error."""
    return [*probability_columns(classes), "label", "error"]


def probability_columns(classes: Sequence[str]) -> list[str]:
    """p_<class> for each class, in label order."""
    return [f"{PROBABILITY_PREFIX}{name}" for name in classes]


class ImageScorer:
    """Loads the backbone and head(s) once; `score(frame)` -> p_<class>..., label, error per row.

    head_weights: the head's weights file; for an ensemble, one file per member, in order.
    """

    def __init__(
        self,
        spec: ServingSpec,
        backbone_weights: str | Path,
        head_weights: str | Path | Sequence[str | Path],
    ):
        # The models' graphs import Keras: only a loaded scorer pays for it, never `emotr
        # predict`'s argument checks nor a reader of the spec.
        from emotr.extract.backbone import FeatureExtractor, features_extractor
        from emotr.search.finetune_model import serving_parts

        self.spec = spec
        # What the backbone runs at on this machine (a bfloat16 model where bfloat16 is not
        # native: float32, 3.4x faster than emulated bfloat16 there, docs/benchmarks.md).
        self.precision = run_precision(spec.backbone.precision, machine_bfloat16())
        if self.precision != spec.backbone.precision:
            log.info("bfloat16 is not native on this machine: the backbone runs in float32")
        backbone = spec.backbone.model_copy(
            update={"weights": str(backbone_weights), "precision": self.precision}
        )
        if spec.members:
            files = [head_weights] if isinstance(head_weights, str | Path) else list(head_weights)
            if len(files) != len(spec.members):
                raise ValueError(
                    f"an ensemble of {len(spec.members)} heads needs as many weight files, "
                    f"got {len(files)}"
                )
            # One VGG pass for every member: the union of their taps (a call gives them side
            # by side, in spec.taps order; score_features splits them again).
            self.extractor = FeatureExtractor(backbone, SERVING_BATCH, outputs=spec.taps)
            self.heads = [
                _loaded_head(m.head, m.n_features, len(spec.classes), path)
                for m, path in zip(spec.members, files, strict=True)
            ]
            return
        if spec.activation is not None:  # `features` are then activations
            self.extractor, self.head = serving_parts(
                spec.head, backbone, spec.activation, SERVING_BATCH, len(spec.classes)
            )
            self.head.load_weights(str(head_weights))
        else:
            # The taps the head was trained on, combined as in training (emotr.taps).
            self.extractor = features_extractor(backbone, spec.head.features, SERVING_BATCH)
            self.head = _loaded_head(spec.head, spec.n_features, len(spec.classes), head_weights)
        self.heads = [self.head]

    def score_features(self, features: np.ndarray | Mapping[str, np.ndarray]) -> np.ndarray:
        """(n, K) class probabilities of features: what `extractor` gives (the gate and predict
        give cached features of a single head's fingerprint). An ensemble takes its taps, by
        name or side by side in spec.taps order, and averages its members' probabilities."""
        from emotr.search.head import predict_proba

        if not self.spec.members:
            if isinstance(features, Mapping):
                raise TypeError("a single-head model scores one feature matrix, not named taps")
            if len(features) == 0:
                return np.zeros((0, len(self.spec.classes)), dtype=np.float64)
            return predict_proba(self.head, np.asarray(features, dtype=np.float32))
        taps = self._named_taps(features)
        n_rows = len(next(iter(taps.values())))
        if n_rows == 0:
            return np.zeros((0, len(self.spec.classes)), dtype=np.float64)
        probabilities = [
            predict_proba(head, combine_features(member.head.features, taps))
            for member, head in zip(self.spec.members, self.heads, strict=True)
        ]
        return np.mean(probabilities, axis=0)

    def _named_taps(self, features: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, Any]:
        """An ensemble's taps by name, from a mapping or from the taps side by side."""
        wanted = self.spec.taps
        if isinstance(features, Mapping):
            missing = [tap for tap in wanted if tap not in features]
            if missing:
                raise ValueError(f"the ensemble reads taps {list(wanted)}; missing {missing}")
            return {tap: features[tap] for tap in wanted}
        matrix = np.asarray(features, dtype=np.float32)
        dims = [parse_tap(tap).dim for tap in wanted]
        if matrix.ndim != 2 or matrix.shape[1] != sum(dims):
            raise ValueError(
                f"an ensemble scores its taps {'+'.join(wanted)} side by side ({sum(dims)} "
                f"columns), got shape {matrix.shape}: one cached feature matrix of a single "
                "fingerprint is not its input; give the taps by name, or images"
            )
        columns = np.split(matrix, np.cumsum(dims)[:-1], axis=1)
        return dict(zip(wanted, columns, strict=True))

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
                pixels.append(self.decode(input_bytes(image, path)))
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

    def decode(self, data: bytes) -> np.ndarray:
        """Image bytes -> uint8 pixels by the model's decode rules; DecodeError says why not."""
        return self.decode_with_size(data).pixels

    def decode_with_size(self, data: bytes) -> DecodedImage:
        """decode, with the upright original's size (where an overlay of the image is drawn)."""
        decode = self.spec.decode
        return decode_image_with_size(
            data,
            tuple(self.spec.backbone.input_size),
            max_pixels=decode.max_pixels,
            background=tuple(decode.background),
            resize=decode.resize,
        )


def _loaded_head(params: HeadParams, n_features: int, n_classes: int, weights: str | Path) -> Any:
    """A head built by emotr.search.head.build_head with the weights of a `.weights.h5` file."""
    from emotr.search.head import build_head

    # Normalization needs data to build; the loaded weights replace what it adapts to.
    placeholder = np.zeros((2, n_features), dtype=np.float32)
    head = build_head(params, n_features, placeholder, n_classes)
    head.load_weights(str(weights))
    return head


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


def input_bytes(image: Any, path: Any = None) -> bytes:
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
