"""Pictures of class activation maps: the heatmap over its image, a contact sheet, labelled grids.

Display rule (emotr.insight.cam gives the raw signed map M): ReLU (only evidence for the class
explained), divided by its maximum into [0, 1] (a map with no positive value shows no heat),
upsampled bilinearly to the image, coloured with matplotlib's `jet` and blended over the image:
(1 - alpha) * image + alpha * colour, alpha = explain.alpha. Pillow draws the sheets, so that a
contact sheet of thousands of images costs milliseconds per tile.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

# Overlays are written at most this many pixels on their longer side (never enlarged).
DISPLAY_MAX_SIDE = 384
# Tiles of contact sheets and grids fit in this square, above their caption lines.
TILE_SIDE = 160
_LINE_HEIGHT = 12
_MARGIN = 4
_COLUMNS = 8


@dataclass(frozen=True)
class Tile:
    """One image of a sheet: its overlay and the caption lines under it."""

    pixels: np.ndarray  # (h, w, 3) uint8
    caption: tuple[str, ...]


def display_size(height: int, width: int, max_side: int = DISPLAY_MAX_SIDE) -> tuple[int, int]:
    """(height, width) of an overlay of an image of that size: the same shape, at most max_side."""
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def heatmap(raw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(height, width) float32 in [0, 1]: the raw map's ReLU, normalised, upsampled bilinearly."""
    positive = np.maximum(np.asarray(raw, np.float32), 0)
    top = float(positive.max(initial=0.0))
    scaled = positive / top if top > 0 else positive
    height, width = size
    image = Image.fromarray(scaled, "F").resize((width, height), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(image, np.float32), 0.0, 1.0)


def overlay(pixels: np.ndarray, raw: np.ndarray, alpha: float) -> np.ndarray:
    """The image (h, w, 3) uint8 with the map's heat blended over it (alpha = its opacity)."""
    heat = heatmap(raw, pixels.shape[:2])
    colour = colormaps["jet"](heat)[..., :3] * 255.0
    blended = (1.0 - alpha) * pixels.astype(np.float32) + alpha * colour
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def png_bytes(pixels: np.ndarray, compress_level: int = 6) -> bytes:
    """An (h, w, 3) uint8 image as PNG bytes (zlib level 1..9: faster .. smaller, the same
    pixels)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def caption_lines(
    classes: Sequence[str], proba: np.ndarray, predicted: int, given: int | None = None
) -> tuple[str, ...]:
    """Caption of a tile: the given label (when known), the predicted one, P of each class."""
    lines = [] if given is None else [f"given: {classes[given]}"]
    lines.append(f"predicted: {classes[predicted]}")
    probabilities = [f"{name[:10]} {p:.2f}" for name, p in zip(classes, proba, strict=True)]
    # Two classes per line: a tile is TILE_SIDE pixels wide.
    lines += [", ".join(probabilities[i : i + 2]) for i in range(0, len(probabilities), 2)]
    return tuple(lines)


def thumbnail(pixels: np.ndarray, side: int = TILE_SIDE) -> np.ndarray:
    """The image shrunk (never enlarged) to fit in a side x side square."""
    image = Image.fromarray(pixels, "RGB")
    image.thumbnail((side, side), Image.Resampling.BILINEAR)
    return np.asarray(image)


def sheet(tiles: Sequence[Tile], title: str = "", columns: int = _COLUMNS) -> bytes:
    """PNG of tiles in rows of `columns` (fitted to TILE_SIDE), captions under, a title above."""
    if not tiles:
        raise ValueError("a sheet needs at least one tile")
    font = ImageFont.load_default()
    columns = min(columns, len(tiles))
    n_lines = max(len(tile.caption) for tile in tiles)
    cell_w = TILE_SIDE + 2 * _MARGIN
    cell_h = TILE_SIDE + n_lines * _LINE_HEIGHT + 2 * _MARGIN
    top = _LINE_HEIGHT + 2 * _MARGIN if title else 0
    rows = math.ceil(len(tiles) / columns)
    canvas = Image.new("RGB", (columns * cell_w, top + rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((_MARGIN, _MARGIN), title, fill=(0, 0, 0), font=font)
    for index, tile in enumerate(tiles):
        x0 = (index % columns) * cell_w + _MARGIN
        y0 = top + (index // columns) * cell_h + _MARGIN
        small = thumbnail(tile.pixels)
        canvas.paste(Image.fromarray(small, "RGB"), (x0, y0))
        for line, text in enumerate(tile.caption):
            at = (x0, y0 + TILE_SIDE + line * _LINE_HEIGHT)
            draw.text(at, text, fill=(0, 0, 0), font=font)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()
