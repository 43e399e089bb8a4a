"""What a replica computes: decoded uploads, the VGG passes of a batch of concurrent requests, and
the overlays of /explain.

A batch holds (version, pixels, explain) items from any request in flight. It runs one pass per
(version, explain) group: a plain pass of the version's ImageScorer for /predict, its CamModel
(the same graphs and weights, the head's gradient on top) for /explain. So a batch never mixes
versions, and /explain's probabilities are the scorer's.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from emotr.data.imageio import DecodedImage, DecodeError, failure_reason
from emotr.deploy.serving import input_bytes
from emotr.insight.explain import display_pixels
from emotr.insight.overlay import overlay, png_bytes
from emotr.serve.versions import ServedVersion


@dataclass(frozen=True)
class BatchItem:
    """One image of a request, waiting for its batch."""

    version: ServedVersion
    pixels: np.ndarray  # (H, W, 3) uint8 at the version's input size
    explain: bool  # also its class activation map


@dataclass(frozen=True)
class Explained:
    """An image's class probabilities and the raw map of its predicted class."""

    proba: np.ndarray  # (K,)
    raw_map: np.ndarray  # (gh, gw) signed, as emotr.insight.cam gives it


def batch_outputs(items: Sequence[BatchItem]) -> list[np.ndarray | Explained]:
    """Probabilities (K,) of each plain item, an Explained of each explain item: one pass per
    (version, explain) group of the batch."""
    results: list[Any] = [None] * len(items)
    groups: dict[tuple[int, bool], list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault((id(item.version), item.explain), []).append(index)
    for (_, explain), indices in groups.items():
        version = items[indices[0]].version
        pixels = np.stack([items[i].pixels for i in indices])
        if explain:
            found = version.cam_model().explain(pixels)
            answers = [Explained(p, m) for p, m in zip(found.proba, found.maps, strict=True)]
        else:
            scorer = version.scorer
            answers = list(scorer.score_features(scorer.extractor(pixels)))
        for i, answer in zip(indices, answers, strict=True):
            results[i] = answer
    return results


def decode_all(scorer: Any, values: Sequence[Any]) -> list[DecodedImage | str]:
    """Each value (bytes or base64 text) decoded by the version's rules at its input size, with
    its original size; or the reason it is no image."""
    decoded: list[DecodedImage | str] = []
    for value in values:
        try:
            decoded.append(scorer.decode_with_size(input_bytes(value)))
        except (DecodeError, OSError) as error:
            decoded.append(failure_reason(error))
    return decoded


def overlay_data_uri(
    data: bytes, original: DecodedImage, raw_map: np.ndarray, spec: Any, alpha: float
) -> str:
    """The heatmap over the image as `emotr explain` draws it, as a PNG data: URI."""
    pixels = display_pixels(data, original.height, original.width, spec.decode)
    # zlib level 1: a quarter of the default's time (7 against 25 ms at 384 px here), 15 % more
    # bytes, the same pixels: /explain answers many images, each once.
    encoded = base64.b64encode(png_bytes(overlay(pixels, raw_map, alpha), 1)).decode()
    return f"data:image/png;base64,{encoded}"
