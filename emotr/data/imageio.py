"""Decode image files into the RGB pixels the backbone sees, one or a batch; the bad-input rules.

Every rule that changes the pixels of a decodable image (frame, orientation, mode conversion,
background, resize) is part of DECODE_RULES_VERSION: bump it when one changes, so that cached
features made under the old rules are not reused.
"""

from __future__ import annotations

import hashlib
import io
import re
import struct
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from emotr.config import DecodeConfig
from emotr.storage import read_bytes

DECODE_RULES_VERSION = "1"

# decode.resize: the whole image, no crop (the tutorial squashes the image to the input size).
# Pillow widens the bilinear filter with the scale factor, so downscaling is antialiased; nearest
# is Keras' load_img default, so the tutorial's. reducing_gap=None keeps Pillow from first
# shrinking JPEGs in the decoder (draft) or by box reduction: one exact filter, whatever the
# source size or format.
RESAMPLING = {"bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST}
DEFAULT_RESIZE = "bilinear"
# The bilinear rule's text is the one every cache made before decode.resize existed hashed.
RESIZE_RULES = {mode: f"pillow-{mode},reducing_gap=None,no-crop,squash" for mode in RESAMPLING}

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}

# What Pillow and its plugins raise on bad input. struct.error, EOFError and IndexError come out of
# plugins that read past the end of a short header.
_DECODE_FAILURES = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    IndexError,
    KeyError,
    struct.error,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)


class DecodeError(ValueError):
    """An image file that cannot be turned into pixels; `reason` says why in a few words."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def failure_reason(error: DecodeError | OSError) -> str:
    """Why an image could not be used, for its output row: what decoding or reading said."""
    return error.reason if isinstance(error, DecodeError) else f"cannot read file: {error}"


@dataclass(frozen=True)
class DecodedImage:
    """Pixels resized for the backbone, and the size of the upright original they came from."""

    pixels: np.ndarray  # (height, width, 3) uint8 RGB at the requested size
    height: int  # of the original, after EXIF orientation
    width: int


def decode_image(
    data: bytes,
    size: tuple[int, int],
    *,
    max_pixels: int,
    background: tuple[int, int, int] = (255, 255, 255),
    resize: str = DEFAULT_RESIZE,
) -> np.ndarray:
    """Decode an image file's bytes to (height, width, 3) uint8 RGB, `size` = (height, width).

    The first frame of an animation is used, EXIF orientation is applied, transparency is
    composited onto `background`, `resize` (decode.resize: bilinear | nearest) is Pillow's filter
    to `size`. Raises DecodeError with a short reason for anything else.
    """
    return decode_image_with_size(
        data, size, max_pixels=max_pixels, background=background, resize=resize
    ).pixels


def decode_image_with_size(
    data: bytes,
    size: tuple[int, int],
    *,
    max_pixels: int,
    background: tuple[int, int, int] = (255, 255, 255),
    resize: str = DEFAULT_RESIZE,
) -> DecodedImage:
    """decode_image, plus the upright original size, from one opening of the bytes."""
    if not data:
        raise DecodeError("empty file")
    resample = _resampling(resize)
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; a bomb is an error here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                _check_pixels(image.size, max_pixels)
                image.seek(0)
                image.load()  # a truncated JPEG passes open() and verify(), and fails here
                # In place: the copy Pillow returns when there is nothing to turn cost about a
                # millisecond per image, a quarter of the decode.
                ImageOps.exif_transpose(image, in_place=True)
                width, height = image.size
                rgb = _to_rgb(image, background)
                rgb = rgb.resize((size[1], size[0]), resample, reducing_gap=None)
    except DecodeError:
        raise
    except _DECODE_FAILURES as error:
        raise DecodeError(_describe(error, max_pixels)) from error
    return DecodedImage(np.array(rgb, dtype=np.uint8), height, width)


def hash_keys(sha256s: Iterable[str]) -> np.ndarray:
    """A compact sorted set of sha256 hex digests for `decode_batch(skip=...)`.

    The first 16 bytes of each digest: 16 MB for a million images, where a Python set of the
    hex strings takes about ten times that; a false match needs 2**128 luck.
    """
    keys = np.array([bytes.fromhex(digest[:32]) for digest in sha256s], dtype="S16")
    return np.unique(keys)


def _in_keys(keys: np.ndarray, sha256: str) -> bool:
    key = np.array([bytes.fromhex(sha256[:32])], dtype="S16")
    position = int(np.searchsorted(keys, key)[0])
    return position < len(keys) and keys[position] == key[0]


def decode_batch(
    batch: dict[str, np.ndarray],
    size: tuple[int, int],
    max_pixels: int,
    background: tuple[int, int, int],
    skip: np.ndarray | None = None,
    resize: str = DEFAULT_RESIZE,
) -> dict[str, np.ndarray]:
    """Read, hash and decode a batch of files; bad files become ok=False rows with a reason.

    `batch` holds "path" and "sha256" columns (a Ray Data numpy batch); each file is read once
    and opened once. An empty sha256 is a file the listing did not hash: the bytes read here
    give it (the output's sha256). Files whose hash is in `skip` (`hash_keys`: features already
    cached) are hashed but not decoded: cached=True, ok=False, no reason. `resize`: decode.resize.
    """
    n = len(batch["path"])
    pixels = np.zeros((n, size[0], size[1], 3), np.uint8)
    ok, cached = np.zeros(n, bool), np.zeros(n, bool)
    reasons = np.full(n, "", dtype=object)
    sha256s = np.array(batch["sha256"], dtype=object)
    heights, widths = np.zeros(n, np.int32), np.zeros(n, np.int32)
    for i, (path, expected) in enumerate(zip(batch["path"], batch["sha256"], strict=True)):
        try:
            data, sha256s[i] = _read_checked(path, expected)
            if skip is not None and _in_keys(skip, sha256s[i]):
                cached[i] = True
                continue
            decoded = decode_image_with_size(
                data, size, max_pixels=max_pixels, background=background, resize=resize
            )
        except (DecodeError, OSError) as error:
            reasons[i] = failure_reason(error)
            continue
        pixels[i], heights[i], widths[i] = decoded.pixels, decoded.height, decoded.width
        ok[i] = True
    return {
        "path": batch["path"],
        "sha256": sha256s,
        "pixels": pixels,
        "ok": ok,
        "cached": cached,
        "reason": reasons,
        "height": heights,
        "width": widths,
    }


def _read_checked(path: str, expected_sha256: str) -> tuple[bytes, str]:
    """A file's bytes and sha256; DecodeError when the listing hashed other bytes."""
    data = read_bytes(path)
    actual = hashlib.sha256(data).hexdigest()
    # Features must belong to the bytes that were listed (an index or an earlier read).
    if expected_sha256 and actual != expected_sha256:
        raise DecodeError(f"file changed since it was listed (sha256 now {actual[:12]})")
    return data, actual


def _resampling(resize: str) -> Image.Resampling:
    try:
        return RESAMPLING[resize]
    except KeyError:
        raise ValueError(
            f"decode.resize must be one of {', '.join(RESAMPLING)}, got {resize!r}"
        ) from None


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparent pixels are composited onto `background`."""
    if image.mode in _SIXTEEN_BIT_MODES:
        image = _sixteen_to_eight_bits(image)
    elif image.mode == "F":
        # Float images are taken as 0..255, as Pillow's own F -> L conversion does.
        values = np.nan_to_num(np.asarray(image, dtype=np.float32))
        image = Image.fromarray(np.clip(values, 0, 255).round().astype(np.uint8))
    if not _has_alpha(image):
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    canvas = Image.new("RGB", rgba.size, tuple(background))
    canvas.paste(rgba, mask=rgba.getchannel("A"))
    return canvas


def _sixteen_to_eight_bits(image: Image.Image) -> Image.Image:
    # Converting I;16 straight to RGB clips at 255, so nearly every pixel comes out white. Integer
    # images are taken as 16-bit (0..65535: PNG and TIFF open their 16-bit grey as I;16 or I).
    values = np.asarray(image).astype(np.float64)
    return Image.fromarray(np.clip(values / 257.0, 0, 255).round().astype(np.uint8))


def _has_alpha(image: Image.Image) -> bool:
    # P, L and RGB images carry transparency in info (a tRNS chunk), not in a channel.
    return image.mode in _ALPHA_MODES or "transparency" in image.info


def _check_pixels(image_size: tuple[int, int], max_pixels: int) -> None:
    n_pixels = image_size[0] * image_size[1]
    if n_pixels > max_pixels:
        raise DecodeError(f"too many pixels: {n_pixels} > {max_pixels} (decode.max_pixels)")


def _describe(error: BaseException, max_pixels: int) -> str:
    message = _shorten(str(error)) or type(error).__name__
    if isinstance(error, Image.DecompressionBombError | Image.DecompressionBombWarning):
        # Pillow's own process-wide cap (Image.MAX_IMAGE_PIXELS) fired before ours could.
        found = re.search(r"\((\d+) pixels\)", message)
        if found and int(found[1]) > max_pixels:
            return f"too many pixels: {found[1]} > {max_pixels} (decode.max_pixels)"
        return f"too many pixels: {message} (PIL.Image.MAX_IMAGE_PIXELS)"
    if isinstance(error, UnidentifiedImageError):
        return "not an image: no image format recognises these bytes"
    if "truncated" in message.lower():
        return f"truncated image: {message}"
    return f"corrupt image: {type(error).__name__}: {message}"


def _shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def decode_rules(cfg: DecodeConfig) -> dict[str, str]:
    """Everything about decoding that changes the pixels of a decodable image, for the cache key.

    decode.max_pixels is left out: it decides which files fail, not what a decoded image looks like.
    """
    return {
        "decode_rules_version": DECODE_RULES_VERSION,
        "resize": RESIZE_RULES[cfg.resize],
        "background": ",".join(str(channel) for channel in cfg.background),
        "frame": "first",
        "orientation": "exif",
        "sixteen_bit": "divide-by-257",
    }
