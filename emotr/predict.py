"""Classify image files with a registered model: decode, extract features, apply the head."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from emotr.config import Config
from emotr.imageio import DecodeError, decode_image
from emotr.registry import load_deployed
from emotr.track import Tracker


@dataclass(frozen=True)
class Prediction:
    """One image's result; `error` is set (and score NaN) when it could not be decoded."""

    path: Path
    score: float
    class_name: str
    error: str | None = None


def predict_files(
    cfg: Config, tracker: Tracker, paths: Sequence[Path], version_or_alias: str
) -> list[Prediction]:
    """P(positive) for each file with the registered version or alias of cfg.registry.model_name."""
    from emotr.backbone import FeatureExtractor

    deployed = load_deployed(tracker, cfg.registry.model_name, version_or_alias)
    decoded, results = {}, {}
    for path in paths:
        try:
            decoded[path] = decode_image(
                Path(path).read_bytes(),
                deployed.backbone.input_size,
                max_pixels=deployed.decode.max_pixels,
                background=deployed.decode.background,
            )
        except (OSError, DecodeError) as error:
            results[path] = Prediction(Path(path), float("nan"), "-", str(error))
    if decoded:
        features = FeatureExtractor(deployed.backbone)(np.stack(list(decoded.values())))
        frame = pd.DataFrame(features, columns=[str(i) for i in range(features.shape[1])])
        scores = np.asarray(deployed.head.predict(frame), dtype=np.float64).reshape(-1)
        for path, score in zip(decoded, scores, strict=True):
            label = int(score >= 0.5)
            results[path] = Prediction(Path(path), float(score), deployed.classes[label])
    return [results[path] for path in paths]
