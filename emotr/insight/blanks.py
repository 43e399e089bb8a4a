"""Near-blank images: cached features close to those of uniform-colour images.

Why this criterion: the cache holds pooled features only, so the pixels' spread is not there to
read, and decoding every image again would cost more than the whole audit. A blank image is one
whose features are those of a uniform image: the backbone (same weights, decode rules and
pooling) runs once on a few uniform colours, and an image counts as near-blank when its raw
features point the same way as one of them (cosine similarity >= audit.near_blank_similarity).
Measured on 278 demo faces (hed-bsds500, 224x224): the faces' highest similarity to a blank was
0.954 (median 0.91); a grey, black or white frame with pixel noise (sd 4 or 12), a beige page
with faint text, a soft gradient and a face darkened to 5 % all had 0.990 to 0.999, a face
washed out to 15 % contrast 0.981. (Standardised features, as the near-duplicates use, separate
these worse: the faces reached 0.84, noisy frames only 0.80.) The references are committed to
the feature cache under the sha256 of their PNG bytes, as an extraction of those files would
store them, so only the first audit of a cache loads Keras.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from emotr.cache.fingerprint import CacheKey
from emotr.cache.store import FeatureCache
from emotr.config import BackboneConfig, DecodeConfig
from emotr.data.imageio import decode_image

# Black to white and the primaries: an empty frame, an over- or under-exposed one, a colour card.
BLANK_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "dark grey": (64, 64, 64),
    "grey": (128, 128, 128),
    "light grey": (192, 192, 192),
    "white": (255, 255, 255),
    "red": (200, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 60, 200),
}


@dataclass(frozen=True)
class BlankReferences:
    """The features (n, dim) of uniform-colour images, and the colour each row is."""

    names: tuple[str, ...]
    features: np.ndarray


def blank_png(colour: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    """A uniform PNG of `colour`, (height, width) = size."""
    buffer = io.BytesIO()
    Image.new("RGB", (size[1], size[0]), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def blank_references(
    key: CacheKey,
    backbone: BackboneConfig,
    decode: DecodeConfig,
    before_backbone: Callable[[], None] | None = None,
) -> BlankReferences:
    """The features of BLANK_COLOURS under `key`'s fingerprint: from the cache, else the backbone
    runs on them here (once per cache) and they are committed.

    before_backbone: called before Keras loads (the CLI holds TensorFlow's start-up lines).
    """
    files = {name: blank_png(rgb, backbone.input_size) for name, rgb in BLANK_COLOURS.items()}
    sha256s = [hashlib.sha256(data).hexdigest() for data in files.values()]
    cache = FeatureCache(key.root, key.fingerprint, key.inputs)
    if not set(sha256s) <= cache.cached_hashes():
        if before_backbone is not None:
            before_backbone()
        pixels = np.stack([_decoded(data, backbone, decode) for data in files.values()])
        features = _run_backbone(backbone, pixels)
        height, width = backbone.input_size
        cache.commit(sha256s, features, [height] * len(sha256s), [width] * len(sha256s))
    return BlankReferences(tuple(files), cache.load(sha256s))


def _decoded(data: bytes, backbone: BackboneConfig, decode: DecodeConfig) -> np.ndarray:
    return decode_image(
        data,
        backbone.input_size,
        max_pixels=decode.max_pixels,
        background=decode.background,
        resize=decode.resize,
    )


def _run_backbone(backbone: BackboneConfig, pixels: np.ndarray) -> np.ndarray:
    # Keras is imported by the extractor: only here, so that a warm audit never loads it.
    from emotr.extract.backbone import FeatureExtractor

    return FeatureExtractor(backbone, batch_size=len(pixels))(pixels)
