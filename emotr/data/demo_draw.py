"""Drawing the demo set's photo-like faces (emotr.data.demo: the ambiguity model, the files).

Each part of a picture draws from its own random stream (background, face, photo), so that a
change to one part leaves the others as they were; the face's bounding box is computed from the
draws, never drawn itself, so reporting it changes no byte of an image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Rendered curvatures are clipped to this (a region where the class is certain anyway); the
# mouth's sag is sign(r) * SAG_MAX * (|r| / RENDER_CLIP) ** SAG_POWER (see emotr.data.demo).
RENDER_CLIP = 0.9
SAG_MAX = 1.25
SAG_POWER = 0.65

_SKIN_TONES = np.array(
    [[255, 224, 196], [241, 194, 160], [224, 172, 125], [198, 134, 90], [141, 85, 54], [92, 56, 38]]
)
_HAIR = np.array([[20, 16, 14], [60, 40, 25], [110, 75, 40], [190, 150, 90], [150, 60, 30]])


@dataclass(frozen=True)
class FaceBox:
    """The face's bounding box in pixels of the image (x right, y down): the axis-aligned box of
    its tilted skin ellipse (hair, ears and neck outside it)."""

    x0: float
    y0: float
    x1: float
    y1: float


def render_face(
    rng: np.random.Generator, size: tuple[int, int], curvature: float
) -> tuple[Image.Image, int]:
    """One photo-like RGB image (height, width) of a face; returns it and its JPEG quality."""
    image, quality, _ = render_face_with_box(rng, size, curvature)
    return image, quality


def render_face_with_box(
    rng: np.random.Generator, size: tuple[int, int], curvature: float
) -> tuple[Image.Image, int, FaceBox]:
    """render_face, and where it drew the face (the same draws: the same image)."""
    height, width = size
    # One stream per part, so that a change to how one part is drawn leaves the others as they were.
    background, face, photo = rng.spawn(3)
    canvas = _draw_background(background, width, height)
    face_h = face.uniform(0.7, 0.9) * min(size)
    patch, (dx, dy), face_w = _draw_face(
        face, face_h, float(np.clip(curvature, -RENDER_CLIP, RENDER_CLIP))
    )
    # Small tilts only: an upside-down smile is a frown, which would flip the label.
    angle = face.uniform(-15, 15)
    # Bilinear halves the cost of bicubic, and blur, noise and JPEG come after it anyway.
    patch = patch.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    turn = math.radians(angle)
    dx, dy = dx * math.cos(turn) + dy * math.sin(turn), -dx * math.sin(turn) + dy * math.cos(turn)
    face_x, face_y = face.uniform(0.35, 0.65) * width, face.uniform(0.4, 0.58) * height
    corner = (round(face_x - dx - patch.width / 2), round(face_y - dy - patch.height / 2))
    canvas.paste(patch, corner, patch)
    # Pillow rotates about the patch's centre and keeps it at the centre of the expanded patch.
    centre = (corner[0] + patch.width / 2 + dx, corner[1] + patch.height / 2 + dy)
    box = _ellipse_box(centre, face_w / 2, face_h / 2, turn)
    return _finish_photo(photo, canvas), int(photo.integers(60, 96)), box


def _ellipse_box(centre: tuple[float, float], a: float, b: float, turn: float) -> FaceBox:
    """Bounding box of an ellipse of half axes a (across) and b (down) tilted by `turn`."""
    half_x = math.hypot(a * math.cos(turn), b * math.sin(turn))
    half_y = math.hypot(a * math.sin(turn), b * math.cos(turn))
    x, y = centre
    return FaceBox(x - half_x, y - half_y, x + half_x, y + half_y)


def _random_colour(rng: np.random.Generator, saturation: float = 1.0) -> tuple[int, ...]:
    colour = rng.uniform(0, 255, size=3)
    colour = colour.mean() + saturation * (colour - colour.mean())
    return tuple(int(v) for v in colour)


def _ramp(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A linear ramp from -0.5 to 0.5 over the image in a random direction (float32, H x W)."""
    angle = rng.uniform(0, 2 * np.pi)
    xs = np.linspace(-0.5, 0.5, width, dtype=np.float32) * np.float32(np.cos(angle))
    ys = np.linspace(-0.5, 0.5, height, dtype=np.float32) * np.float32(np.sin(angle))
    ramp = ys[:, None] + xs[None, :]
    return ramp / max(float(np.abs(ramp).max()) * 2, 1e-6)


def _draw_background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    start = np.array(_random_colour(rng, 0.5), dtype=np.float32)
    stop = np.array(_random_colour(rng, 0.5), dtype=np.float32)
    pixels = (start + stop) / 2 + _ramp(rng, width, height)[..., None] * (stop - start)
    canvas = Image.fromarray(pixels.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    scale = min(width, height)
    for _ in range(int(rng.integers(3, 10))):
        x0, y0 = rng.uniform(-0.1, 1.0) * width, rng.uniform(-0.1, 1.0) * height
        w, h = rng.uniform(0.05, 0.5, size=2) * scale
        # Halfway to the backdrop's mean colour: full-contrast clutter edges outweighed the mouth in
        # the pooled features (measured: CV AUC -0.02 at full contrast and 4-12 shapes).
        colour = _soften(_random_colour(rng, rng.uniform(0.2, 0.9)), (start + stop) / 2)
        kind = rng.integers(0, 4)
        if kind == 0:
            draw.rectangle((x0, y0, x0 + w, y0 + h), fill=colour)
        elif kind == 1:
            draw.ellipse((x0, y0, x0 + w, y0 + h), fill=colour)
        elif kind == 2:
            draw.line((x0, y0, x0 + w, y0 + h), fill=colour, width=max(1, round(w / 15)))
        else:
            draw.polygon(
                [(x0 + rng.uniform(0, w), y0 + rng.uniform(0, h)) for _ in range(3)], colour
            )
    # An out-of-focus background, as behind a portrait.
    return canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.012) * scale))


def _soften(colour: tuple[int, ...], towards: np.ndarray) -> tuple[int, ...]:
    return tuple(int(v) for v in (np.array(colour) + towards) / 2)


def _draw_face(
    rng: np.random.Generator, h: float, curvature: float
) -> tuple[Image.Image, tuple[float, float], float]:
    """A face h pixels tall on a transparent patch, the face centre's offset from the patch's
    centre, and the face's width."""
    w = h * rng.uniform(0.72, 0.86)
    # The patch hugs the drawing (shoulders at the sides and bottom): rotation cost is per pixel.
    patch = Image.new("RGBA", (round(2.3 * w), round(1.95 * h)), (0, 0, 0, 0))
    draw = ImageDraw.Draw(patch)
    cx, cy = 1.15 * w, 0.62 * h
    skin = _skin_colour(rng)
    shade = tuple(int(v * 0.8) for v in skin)
    hair = tuple(int(v) for v in _HAIR[rng.integers(len(_HAIR))] + rng.integers(-10, 11, size=3))
    has_hair = rng.random() < 0.85
    draw.rectangle((cx - 0.2 * w, cy + 0.3 * h, cx + 0.2 * w, cy + 0.8 * h), fill=shade)
    clothes = _random_colour(rng, rng.uniform(0.2, 1.0))
    draw.ellipse((cx - 1.1 * w, cy + 0.66 * h, cx + 1.1 * w, cy + 1.6 * h), fill=clothes)
    if has_hair:
        draw.ellipse((cx - 0.56 * w, cy - 0.56 * h, cx + 0.56 * w, cy + 0.2 * h), fill=hair)
    for sign in (-1, 1):
        ear_x = cx + sign * 0.5 * w
        draw.ellipse((ear_x - 0.07 * w, cy - 0.1 * h, ear_x + 0.07 * w, cy + 0.1 * h), fill=shade)
    outline = max(1, round(0.008 * h))
    draw.ellipse((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), skin, shade, outline)
    if has_hair and rng.random() < 0.7:
        draw.chord((cx - w / 2, cy - h / 2, cx + w / 2, cy + 0.1 * h), 185, 355, fill=hair)
    _draw_eyes(rng, draw, (cx, cy, w, h), hair)
    nose_y = cy + rng.uniform(0.08, 0.14) * h
    nose = (cx, cy - 0.02 * h, cx - 0.04 * w, nose_y, cx + 0.03 * w, nose_y)
    draw.line(nose, fill=shade, width=outline * 2, joint="curve")
    _draw_mouth(rng, draw, (cx, cy + rng.uniform(0.25, 0.29) * h, w, h), skin, curvature)
    return patch, (cx - patch.width / 2, cy - patch.height / 2), w


def _skin_colour(rng: np.random.Generator) -> tuple[int, ...]:
    position = rng.uniform(0, len(_SKIN_TONES) - 1)
    low = int(position)
    high = min(low + 1, len(_SKIN_TONES) - 1)
    tone = _SKIN_TONES[low] + (position - low) * (_SKIN_TONES[high] - _SKIN_TONES[low])
    return tuple(int(v) for v in np.clip(tone + rng.normal(0, 6, size=3), 0, 255))


Box = tuple[float, float, float, float]


def _draw_eyes(rng: np.random.Generator, draw: ImageDraw.ImageDraw, face: Box, hair: tuple) -> None:
    cx, cy, w, h = face
    eye_y = cy - rng.uniform(0.05, 0.11) * h
    spacing = rng.uniform(0.18, 0.23) * w
    iris = tuple(int(v) for v in rng.integers(20, 160, size=3))
    # Brow tilt is drawn independently of the class, so it is a distractor, not a cue.
    tilt = rng.uniform(-0.025, 0.025) * h
    brow_width = max(1, round(0.02 * h))
    for sign in (-1, 1):
        ex = cx + sign * spacing
        white = (ex - 0.09 * w, eye_y - 0.035 * h, ex + 0.09 * w, eye_y + 0.035 * h)
        draw.ellipse(white, fill=(245, 245, 240))
        for radius, colour in ((0.03 * h, iris), (0.013 * h, (10, 10, 10))):
            draw.ellipse((ex - radius, eye_y - radius, ex + radius, eye_y + radius), fill=colour)
        brow_y = eye_y - 0.09 * h
        inner, outer = ex - sign * 0.09 * w, ex + sign * 0.11 * w
        draw.line((inner, brow_y + tilt, outer, brow_y - tilt), fill=hair, width=brow_width)


def _draw_mouth(
    rng: np.random.Generator, draw: ImageDraw.ImageDraw, at: Box, skin: tuple, curvature: float
) -> None:
    cx, my, w, h = at
    # Wide and thick: at 224x224 the mouth spans 2-3 cells of the 7x7 map that VGG16 pools.
    half = rng.uniform(0.3, 0.36) * w
    xs = np.linspace(-1.0, 1.0, 25)
    sag = math.copysign(SAG_MAX * (abs(curvature) / RENDER_CLIP) ** SAG_POWER, curvature)
    # Centred on its own sag so the mouth's height in the face carries no extra cue.
    ys = my + sag * half * ((1 - xs**2) - 0.5)
    points = [(cx + half * x, y) for x, y in zip(xs, ys, strict=True)]
    # Reddish lips with a dark parting line: the lips stand out on light skin, the line on dark skin
    # (a plain dark line scored CV AUC 0.82 on the darkest third of faces, 0.90 on the lightest).
    lips = 0.4 * np.array(skin) + 0.6 * np.array((175, 55, 65)) + rng.integers(-15, 16, size=3)
    lips = tuple(int(v) for v in np.clip(lips, 0, 255))
    thickness = max(2, round(rng.uniform(0.06, 0.075) * h))
    draw.line(points, fill=lips, width=thickness, joint="curve")
    for x, y in (points[0], points[-1]):
        draw.ellipse(
            (x - thickness / 2, y - thickness / 2, x + thickness / 2, y + thickness / 2), lips
        )
    draw.line(points, fill=(35, 12, 16), width=max(1, round(0.3 * thickness)), joint="curve")


def _finish_photo(rng: np.random.Generator, canvas: Image.Image) -> Image.Image:
    """Lighting gradient, colour cast, lens blur and sensor noise."""
    width, height = canvas.size
    canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.004) * min(width, height)))
    light = np.float32(rng.uniform(0.8, 1.15)) * (
        1 + rng.uniform(0.1, 0.7) * _ramp(rng, width, height)
    )
    gain = rng.uniform(0.92, 1.08, size=3).astype(np.float32)
    pixels = np.asarray(canvas, dtype=np.float32) * light[..., None].astype(np.float32) * gain
    noise = rng.standard_normal(size=pixels.shape, dtype=np.float32)
    pixels += np.float32(rng.uniform(1.0, 8.0)) * noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
