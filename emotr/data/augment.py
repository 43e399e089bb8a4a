"""Augmented views of decoded images (extract.views): a random resized crop, a left-right flip
and a small colour jitter, each view's random numbers taken from the image's sha256 and the
view's number, so the same bytes give the same view on every run (a re-run, or a task Ray
retries, computes what is cached; Pillow's fixed-point resampling and blends make the same view
on any machine with the same Pillow). numpy and Pillow only: no Keras.

Views are made from the decoded pixels at backbone.input_size, in the extractor (emotr.extract.
backbone.FeatureExtractor), not in the decode task: the pixels travel to the extractor once, not
once per view (decode tasks feed GPU actors through Ray's object store), the decode rules and
the plain pass stay as they were, and only the views some cache lacks are made. The price: a
crop of 60 % of the area is enlarged up to 1.3x from the resized image, a little softer than a
crop of the file at its full resolution.

The random numbers are the bytes of one sha256 digest rather than a seeded numpy Generator,
whose streams NumPy does not promise to keep across versions (NEP 19).
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance

# Change the version with any change that alters a view: it is part of the views' fingerprint
# (emotr.cache.fingerprint.view_inputs), so views made the old way are never mixed with new ones.
AUGMENT_VERSION = 1
CROP_AREA = (0.6, 1.0)  # share of the image's area a crop covers
CROP_RATIO = (3 / 4, 4 / 3)  # width / height of a crop, drawn log-uniform
FLIP_PROBABILITY = 0.5
BRIGHTNESS = 0.15  # factors drawn uniform in 1 +- this
CONTRAST = 0.15
SATURATION = 0.10
# What the views' fingerprint records: the version and every setting above.
AUGMENTATION = (
    f"v{AUGMENT_VERSION}: crop area {CROP_AREA[0]:g}-{CROP_AREA[1]:g}, ratio "
    f"{CROP_RATIO[0]:.4g}-{CROP_RATIO[1]:.4g}, bilinear; flip p={FLIP_PROBABILITY:g}; "
    f"brightness {BRIGHTNESS:g}, contrast {CONTRAST:g}, saturation {SATURATION:g}"
)


@dataclass(frozen=True)
class ViewParams:
    """One view's draw: the crop box (x0, y0, x1, y1 in pixels), the flip, the jitter factors."""

    box: tuple[float, float, float, float]
    flip: bool
    brightness: float
    contrast: float
    saturation: float


def view_params(sha256: str, k: int, height: int, width: int) -> ViewParams:
    """The draw of view `k` of the image whose bytes hash to `sha256`, of height x width."""
    u = _uniforms(sha256, k)
    area = height * width * (CROP_AREA[0] + u[0] * (CROP_AREA[1] - CROP_AREA[0]))
    low, high = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    ratio = math.exp(low + u[1] * (high - low))
    # Clamped to the image rather than redrawn (torchvision retries): one draw, one crop.
    crop_w = min(math.sqrt(area * ratio), width)
    crop_h = min(math.sqrt(area / ratio), height)
    x0, y0 = u[2] * (width - crop_w), u[3] * (height - crop_h)
    return ViewParams(
        box=(x0, y0, x0 + crop_w, y0 + crop_h),
        flip=bool(u[4] < FLIP_PROBABILITY),
        brightness=1 + BRIGHTNESS * (2 * u[5] - 1),
        contrast=1 + CONTRAST * (2 * u[6] - 1),
        saturation=1 + SATURATION * (2 * u[7] - 1),
    )


def _uniforms(sha256: str, k: int) -> list[float]:
    """Eight numbers in [0, 1) from the digest of `<sha256>:<k>`, four bytes each."""
    digest = hashlib.sha256(f"{sha256}:{k}".encode()).digest()
    return [value / 2**32 for value in struct.unpack(">8I", digest)]


def augmented_view(pixels: np.ndarray, sha256: str, k: int) -> np.ndarray:
    """View `k` (1, 2, ...) of one decoded image: uint8 (H, W, 3) in, uint8 (H, W, 3) out."""
    return augmented_views(np.asarray(pixels)[None], [sha256], k)[0]


def augmented_views(pixels: np.ndarray, sha256s: Sequence[str], k: int) -> np.ndarray:
    """View `k` of each image of a batch: uint8 (n, H, W, 3) and the images' sha256 -> uint8
    (n, H, W, 3)."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"expected uint8 pixels (n, H, W, 3), got {pixels.dtype} {pixels.shape}")
    if len(sha256s) != len(pixels):
        raise ValueError(f"{len(sha256s)} sha256s for {len(pixels)} images")
    height, width = pixels.shape[1:3]
    views = np.empty_like(pixels)
    for i, (image, key) in enumerate(zip(pixels, sha256s, strict=True)):
        views[i] = _view(Image.fromarray(image), view_params(str(key), k, height, width))
    return views


def _view(image: Image.Image, draw: ViewParams) -> np.ndarray:
    """One view with Pillow alone: each step is one C pass over 8-bit pixels, about 1 ms an
    image at 224x224 on one core (VGG16 takes about 150 ms there), and releases the GIL."""
    # Crop and resize in one resampling, with a sub-pixel box: the crop is not rounded.
    view = image.resize(image.size, Image.Resampling.BILINEAR, box=draw.box)
    if draw.flip:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # torchvision's ColorJitter on PIL images: blends with black, the mean grey, the greyscale.
    view = ImageEnhance.Brightness(view).enhance(draw.brightness)
    view = ImageEnhance.Contrast(view).enhance(draw.contrast)
    return np.asarray(ImageEnhance.Color(view).enhance(draw.saturation))
