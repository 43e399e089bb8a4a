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
from PIL import Image

# The drawing lives in demo_draw; RENDER_CLIP and the sag constants are part of the model above.
from emotr.data.demo_draw import (  # noqa: F401 - render_face and the constants, as before
    RENDER_CLIP,
    SAG_MAX,
    SAG_POWER,
    render_face,
    render_face_with_box,
)

AMBIGUOUS_MAX = 0.08
CURVATURE_MAX = 0.6
# With these constants the defaults give a ceiling near 0.9 accuracy, like the tutorial's data.
RENDER_SIGMA = 0.15

# Written into every generated root before anything else: only a root holding it is emotr's to
# change. A hidden name, so that listing a data root never takes it for an image or a class.
DEMO_MARKER = ".emotr-demo.json"
# The demo set's class folders (data.classes null lists them back in this order: sorted).
DEMO_CLASSES = ("negative", "positive")
# The manifest's face box: where render_face drew the face, in pixels of the written image.
FACE_BOX_COLUMNS = ("face_x0", "face_y0", "face_x1", "face_y1")

# numpy has no erf; math.erf over a grid is fast enough (and keeps the demo images as they were).
_erf = np.frompyfunc(math.erf, 1, 1)


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
        image, quality, box = render_face_with_box(rng, size, rendered)
        relative = f"{classes[label]}/face_{index:05d}.jpg"
        (out / relative).write_bytes(_encode_jpeg(image, quality))
        # Significant digits, not decimals: a tiny curvature must not print as a signless 0.
        corners = (f"{value:.1f}" for value in (box.x0, box.y0, box.x1, box.y1))
        rows.append((relative, classes[label], f"{curvature:.6g}", *corners))
    manifest = out / "manifest.csv"
    # Written last so that its presence means a complete data set.
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "curvature", *FACE_BOX_COLUMNS])
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


def _encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    # Fixed encoder settings (no optimize pass, fixed subsampling) keep the bytes reproducible.
    image.save(buffer, format="JPEG", quality=quality, subsampling=0, optimize=False)
    return buffer.getvalue()
