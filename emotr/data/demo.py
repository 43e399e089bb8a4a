"""The synthetic demo data set: photo-like cartoon faces whose mouth curvature sets the label.

Ambiguity model (what the Bayes ceiling in DemoSummary is computed from):

- class: y = 1 (positive, smile) for exactly round(n * positive_share) images, else y = 0;
  the Bayes numbers use P(y = 1) = positive_share.
- true curvature: c = s * m with s = +1 for y = 1 and -1 for y = 0, and magnitude
  m ~ U(0, AMBIGUOUS_MAX) with probability ambiguous_share (a near-flat, ambiguous mouth),
  else m ~ U(AMBIGUOUS_MAX, CURVATURE_MAX). The label is the sign of c.
- rendered curvature: r = c + e, e ~ N(0, RENDER_SIGMA). The image only shows r (clipped to
  +-RENDER_CLIP, a region where the class is certain anyway); every other trait of the image
  (pose, skin, light, clutter, blur, noise, JPEG) is drawn independently of y.

So the best any classifier can do is score p(r) = P(y = 1 | r), whose densities are uniforms
convolved with a Gaussian. bayes_accuracy = E[max(p, 1 - p)] and bayes_auc = AUC of p are
integrated numerically on a fine grid of r: properties of the model, not of the drawn sample.

The mouth is drawn with a sag (its middle below its corners, in units of its half width) of
sign(r) * SAG_MAX * (|r| / RENDER_CLIP) ** SAG_POWER. That map is monotone, so the image shows r
exactly and the ceiling stands; it is concave so that a slight curvature still reads once the image
is shrunk to 224x224 and average-pooled (r = 0.1: a sag of 0.3 half widths; r = 0.6: 0.96).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

AMBIGUOUS_MAX = 0.08
CURVATURE_MAX = 0.6
# With these constants the defaults give a ceiling near 0.9 accuracy, like the tutorial's data.
RENDER_SIGMA = 0.15
RENDER_CLIP = 0.9
SAG_MAX = 1.25
SAG_POWER = 0.65

# Written into every generated root before anything else: only a root holding it is emotr's to
# change. A hidden name, so that listing a data root never takes it for an image or a class.
DEMO_MARKER = ".emotr-demo.json"
# The demo set's class folders (data.classes null lists them back in this order: sorted).
DEMO_CLASSES = ("negative", "positive")

# numpy has no erf; math.erf over a grid is fast enough (and keeps the demo images as they were).
_erf = np.frompyfunc(math.erf, 1, 1)

_SKIN_TONES = np.array(
    [[255, 224, 196], [241, 194, 160], [224, 172, 125], [198, 134, 90], [141, 85, 54], [92, 56, 38]]
)
_HAIR = np.array([[20, 16, 14], [60, 40, 25], [110, 75, 40], [190, 150, 90], [150, 60, 30]])


@dataclass(frozen=True)
class DemoSummary:
    """What generate_demo_dataset wrote and the accuracy ceiling its ambiguity model implies."""

    n_images: int
    n_positive: int
    n_negative: int
    bayes_accuracy: float
    bayes_auc: float
    manifest: Path


def generate_demo_dataset(
    out: Path,
    n: int = 400,
    size: tuple[int, int] = (400, 500),
    seed: int = 0,
    ambiguous_share: float = 0.15,
    positive_share: float = 0.53,
    classes: tuple[str, str] = DEMO_CLASSES,
) -> DemoSummary:
    """Write n synthetic face JPEGs (height, width) into out/<class>/ plus out/manifest.csv.

    `out` must not exist or be empty (or hold an interrupted demo set of emotr's own): a marker
    file, written first, claims the folder as emotr's, so nothing ever lands in a user's data.
    """
    out = Path(out)
    _check_arguments(out, n, size, seed, ambiguous_share, positive_share, classes)
    _claim_folder(out, {"n": n, "size": list(size), "seed": seed, "classes": list(classes)})
    labels = draw_labels(n, positive_share, seed)
    for name in classes:
        (out / name).mkdir(parents=True, exist_ok=True)
    rows = []
    for index, label in enumerate(labels):
        rng = np.random.default_rng([seed, index])
        curvature = draw_curvature(rng, bool(label), ambiguous_share)
        rendered = curvature + rng.normal(0.0, RENDER_SIGMA)
        image, quality = render_face(rng, size, rendered)
        relative = f"{classes[label]}/face_{index:05d}.jpg"
        (out / relative).write_bytes(_encode_jpeg(image, quality))
        # Significant digits, not decimals: a tiny curvature must not print as a signless 0.
        rows.append((relative, classes[label], f"{curvature:.6g}"))
    manifest = out / "manifest.csv"
    # Written last so that its presence means a complete data set.
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "curvature"])
        writer.writerows(rows)
    accuracy, auc = bayes_ceiling(ambiguous_share, positive_share)
    n_positive = int(labels.sum())
    return DemoSummary(n, n_positive, n - n_positive, accuracy, auc, manifest)


def _check_arguments(
    out: Path,
    n: int,
    size: tuple[int, int],
    seed: int,
    ambiguous_share: float,
    positive_share: float,
    classes: tuple[str, str],
) -> None:
    if (out / "manifest.csv").exists() and is_demo_root(out):
        raise FileExistsError(
            f"the demo data set is already there: {out / 'manifest.csv'} exists; "
            f"delete the folder {out} to regenerate it"
        )
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; give a folder that does not exist yet")
    if out.exists() and not is_demo_root(out) and any(out.iterdir()):
        raise FileExistsError(
            f"{out} is not empty and was not made by emotr: the demo data set is written only "
            f"into a new or empty folder, never beside a user's files; give another folder"
        )
    if isinstance(n, bool) or not isinstance(n, Integral) or n < 2:
        raise ValueError(f"n must be an integer >= 2 (one image per class at least), got {n!r}")
    if len(size) != 2 or any(not isinstance(side, Integral) or side < 32 for side in size):
        raise ValueError(f"size must be (height, width) with each side >= 32 pixels, got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not 0.0 <= ambiguous_share <= 1.0:
        raise ValueError(f"ambiguous_share must be in [0, 1], got {ambiguous_share!r}")
    if not 0.0 < positive_share < 1.0:
        raise ValueError(f"positive_share must be strictly between 0 and 1, got {positive_share!r}")
    if len(classes) != 2 or len(set(classes)) != 2 or not all(classes):
        raise ValueError(f"classes must be two distinct non-empty names, got {classes!r}")


def is_demo_root(root: Path) -> bool:
    """True when `root` holds emotr's marker file: a demo set (maybe interrupted) emotr made."""
    return (Path(root) / DEMO_MARKER).is_file()


def is_complete_demo_root(root: Path) -> bool:
    """True when `root` holds a whole demo set of emotr's (marker and manifest, written last)."""
    return is_demo_root(root) and (Path(root) / "manifest.csv").is_file()


def _claim_folder(out: Path, params: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    marker = out / DEMO_MARKER
    if marker.exists():  # an interrupted run of ours: its images are ours to replace
        for image in out.glob("*/face_*.jpg"):
            image.unlink()
    marker.write_text(json.dumps({"generator": "emotr demo-data", **params}, indent=2) + "\n")


def draw_labels(n: int, positive_share: float, seed: int) -> np.ndarray:
    """Shuffled 0/1 labels with round(n * positive_share) ones, at least one of each class."""
    n_positive = min(max(round(n * positive_share), 1), n - 1)
    labels = np.zeros(n, dtype=np.int64)
    labels[:n_positive] = 1
    return np.random.default_rng([seed, n]).permutation(labels)


def draw_curvature(rng: np.random.Generator, positive: bool, ambiguous_share: float) -> float:
    """The true mouth curvature of one face under the ambiguity model (sign = class)."""
    if rng.random() < ambiguous_share:
        low, high = 0.0, AMBIGUOUS_MAX
    else:
        low, high = AMBIGUOUS_MAX, CURVATURE_MAX
    # 1 - U lies in (0, 1], so the magnitude is never exactly 0 and the sign always matches.
    magnitude = high - (high - low) * rng.random()
    return magnitude if positive else -magnitude


def bayes_ceiling(
    ambiguous_share: float,
    positive_share: float,
    render_sigma: float = RENDER_SIGMA,
    n_grid: int = 20_001,
) -> tuple[float, float]:
    """(accuracy, ROC AUC) of the Bayes-optimal score P(y=1 | rendered curvature)."""
    span = CURVATURE_MAX + 8 * render_sigma
    grid = np.linspace(-span, span, n_grid)
    step = grid[1] - grid[0]
    mass_pos = step * (
        ambiguous_share * _uniform_blur(grid, 0.0, AMBIGUOUS_MAX, render_sigma)
        + (1 - ambiguous_share) * _uniform_blur(grid, AMBIGUOUS_MAX, CURVATURE_MAX, render_sigma)
    )
    mass_neg = mass_pos[::-1]  # the negative class is the mirror image
    joint_pos, joint_neg = positive_share * mass_pos, (1 - positive_share) * mass_neg
    accuracy = float(np.maximum(joint_pos, joint_neg).sum())
    total = joint_pos + joint_neg
    score = np.divide(joint_pos, total, out=np.full_like(total, 0.5), where=total > 0)
    order = np.argsort(score, kind="stable")
    pos, neg = mass_pos[order], mass_neg[order]
    # AUC = P(score of a positive > score of a negative); a grid cell ties with itself: half.
    below = np.cumsum(neg) - neg
    auc = float((pos * (below + 0.5 * neg)).sum() / (pos.sum() * neg.sum()))
    return accuracy, auc


def _uniform_blur(x: np.ndarray, low: float, high: float, sigma: float) -> np.ndarray:
    """Density of U(low, high) + N(0, sigma) at x."""
    if high <= low:
        return np.zeros_like(x)
    if sigma <= 0:
        return ((x >= low) & (x < high)) / (high - low)
    upper = _erf((x - low) / (sigma * math.sqrt(2))).astype(float)
    lower = _erf((x - high) / (sigma * math.sqrt(2))).astype(float)
    return 0.5 * (upper - lower) / (high - low)


def render_face(
    rng: np.random.Generator, size: tuple[int, int], curvature: float
) -> tuple[Image.Image, int]:
    """One photo-like RGB image (height, width) of a face; returns it and its JPEG quality."""
    height, width = size
    # One stream per part, so that a change to how one part is drawn leaves the others as they were.
    background, face, photo = rng.spawn(3)
    canvas = _draw_background(background, width, height)
    patch, (dx, dy) = _draw_face(
        face,
        face.uniform(0.7, 0.9) * min(size),
        float(np.clip(curvature, -RENDER_CLIP, RENDER_CLIP)),
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
    return _finish_photo(photo, canvas), int(photo.integers(60, 96))


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
) -> tuple[Image.Image, tuple[float, float]]:
    """A face h pixels tall on a transparent patch, and the face centre's offset from its centre."""
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
    return patch, (cx - patch.width / 2, cy - patch.height / 2)


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


def _encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    # Fixed encoder settings (no optimize pass, fixed subsampling) keep the bytes reproducible.
    image.save(buffer, format="JPEG", quality=quality, subsampling=0, optimize=False)
    return buffer.getvalue()
