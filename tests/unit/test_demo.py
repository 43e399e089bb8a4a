"""The synthetic demo data set: labels, determinism, image format and the Bayes ceiling."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from emotr.data.demo import (
    RENDER_SIGMA,
    bayes_ceiling,
    draw_curvature,
    generate_demo_dataset,
    is_complete_demo_root,
    is_demo_root,
    render_face,
)
from emotr.data.demo_draw import render_face_with_box

# (height, width): small to keep each test near a second, not square to catch a swapped size.
SIZE = (48, 64)


def read_manifest(out: Path) -> list[dict[str, str]]:
    with (out / "manifest.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def image_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.jpg"))}


def test_labels_follow_curvature_sign_and_folder(tmp_path):
    out = tmp_path / "nested" / "demo"  # folders are created as needed
    summary = generate_demo_dataset(out, n=16, size=SIZE, classes=("sad", "happy"))
    rows = read_manifest(out)

    assert summary.manifest == out / "manifest.csv"
    assert len(rows) == summary.n_images == 16
    assert summary.n_positive + summary.n_negative == 16
    assert summary.n_positive == sum(row["label"] == "happy" for row in rows)
    assert {row["label"] for row in rows} == {"sad", "happy"}
    for row in rows:
        assert row["label"] == ("happy" if float(row["curvature"]) > 0 else "sad")
        assert Path(row["path"]).parent.name == row["label"]
        assert Path(row["path"]).name.startswith("face_")
    assert sorted(image_bytes(out)) == sorted(row["path"] for row in rows)


def test_default_share_gives_slight_positive_majority(tmp_path):
    summary = generate_demo_dataset(tmp_path, n=100, size=(32, 32))
    assert (summary.n_positive, summary.n_negative) == (53, 47)


def test_two_images_hold_both_classes(tmp_path):
    summary = generate_demo_dataset(tmp_path, n=2, size=(32, 32), positive_share=0.9)
    assert (summary.n_positive, summary.n_negative) == (1, 1)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    generate_demo_dataset(tmp_path / "a", n=6, size=SIZE, seed=3)
    generate_demo_dataset(tmp_path / "b", n=6, size=SIZE, seed=3)
    generate_demo_dataset(tmp_path / "c", n=6, size=SIZE, seed=4)

    first, again, other = (image_bytes(tmp_path / name) for name in "abc")
    assert first == again
    assert (tmp_path / "a" / "manifest.csv").read_bytes() == (
        tmp_path / "b" / "manifest.csv"
    ).read_bytes()
    assert set(first.values()).isdisjoint(other.values())


def test_images_are_rgb_jpegs_of_the_requested_size_and_vary(tmp_path):
    generate_demo_dataset(tmp_path, n=12, size=SIZE)
    means = []
    for path in sorted(tmp_path.rglob("*.jpg")):
        with Image.open(path) as image:
            assert image.format == "JPEG"
            assert image.mode == "RGB"
            assert image.size == (SIZE[1], SIZE[0])  # Pillow reports (width, height)
            means.append(np.asarray(image, dtype=np.float64).mean(axis=(0, 1)))
    assert len(means) == 12
    assert np.std(means, axis=0).min() > 5  # colour, light and clutter differ between images


def test_the_images_of_a_seed_are_the_bytes_they_always_were(tmp_path):
    # Recorded before the face box was added to the manifest: reporting the box (and moving the
    # drawing into demo_draw) changed no byte of any image.
    generate_demo_dataset(tmp_path, n=6, size=SIZE, seed=3)
    digest = hashlib.sha256()
    for name, data in image_bytes(tmp_path).items():
        digest.update(name.encode() + data)
    assert digest.hexdigest() == "6a8fe018a22999f7f00924a4f233683c0b4bf155743576d8c440c3ed06c66229"


def test_the_manifest_says_where_each_face_is(tmp_path):
    generate_demo_dataset(tmp_path, n=8, size=(120, 150))
    for row in read_manifest(tmp_path):
        x0, y0, x1, y1 = (float(row[f"face_{k}"]) for k in ("x0", "y0", "x1", "y1"))
        assert 0.55 * 120 < y1 - y0 < 1.0 * 120 and 0.35 * 120 < x1 - x0 < 0.9 * 120
        assert 0.3 * 150 < (x0 + x1) / 2 < 0.7 * 150 and 0.35 * 120 < (y0 + y1) / 2 < 0.63 * 120


@pytest.mark.parametrize("seed", [7, 8, 9])
def test_the_mouth_lies_in_the_lower_half_of_the_face_box(seed):
    # Same draws, opposite curvature: the pixels that change are the mouth's.
    size = (200, 240)
    smile, _, box = render_face_with_box(np.random.default_rng(seed), size, 0.6)
    frown, _, same_box = render_face_with_box(np.random.default_rng(seed), size, -0.6)
    assert box == same_box
    rows, cols = np.nonzero(np.abs(np.asarray(smile, float) - np.asarray(frown, float)).max(2) > 40)
    assert box.x0 < cols.mean() < box.x1
    assert (box.y0 + box.y1) / 2 < rows.mean() < box.y1


@pytest.mark.parametrize("magnitude", [0.5, 0.05])
def test_the_class_shows_in_the_mouth_only(magnitude):
    # Same draws, opposite curvature: everything but the mouth is independent of the class, and
    # even a slight curvature bends the mouth visibly.
    smile, smile_quality = render_face(np.random.default_rng(7), SIZE, magnitude)
    frown, frown_quality = render_face(np.random.default_rng(7), SIZE, -magnitude)
    changed = np.abs(np.asarray(smile, float) - np.asarray(frown, float)).max(axis=2) > 30
    assert smile_quality == frown_quality
    assert 0.005 < changed.mean() < 0.1


def test_bayes_ceiling_is_between_chance_and_certainty(tmp_path):
    summary = generate_demo_dataset(tmp_path, n=2, size=(32, 32))
    assert 0.5 < summary.bayes_accuracy < 1
    assert 0.5 < summary.bayes_auc <= 1
    # A property of the model, not of the drawn sample.
    assert (summary.bayes_accuracy, summary.bayes_auc) == bayes_ceiling(0.15, 0.53)


def test_less_ambiguity_raises_the_ceiling():
    clear = bayes_ceiling(0.0, 0.53, render_sigma=0.01)
    murky = bayes_ceiling(0.5, 0.53)
    assert clear[0] > murky[0] and clear[1] > murky[1]
    assert clear[0] > 0.99


def test_bayes_ceiling_matches_a_simulation_of_the_generator():
    # Draw (label, rendered curvature) the way generate_demo_dataset does; the best threshold on
    # the rendered curvature is Bayes-optimal here, so its accuracy must match the ceiling.
    rng = np.random.default_rng(0)
    labels = rng.random(20_000) < 0.53
    true = np.array([draw_curvature(rng, bool(label), 0.15) for label in labels])
    rendered = true + rng.normal(0.0, RENDER_SIGMA, size=true.size)
    accuracy, auc = bayes_ceiling(0.15, 0.53)

    order = np.argsort(rendered)
    sorted_labels = labels[order]
    # Accuracy of "positive above threshold k" for every k: negatives below + positives above.
    negatives_below = np.concatenate([[0], np.cumsum(~sorted_labels)])
    positives_above = sorted_labels.sum() - np.concatenate([[0], np.cumsum(sorted_labels)])
    simulated_accuracy = ((negatives_below + positives_above) / labels.size).max()
    ranks = np.empty(labels.size)
    ranks[order] = np.arange(1, labels.size + 1)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    simulated_auc = (ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)

    assert simulated_accuracy == pytest.approx(accuracy, abs=0.01)
    assert simulated_auc == pytest.approx(auc, abs=0.01)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n": 1}, "n"),
        ({"size": (31, 64)}, "size"),
        ({"size": (64, 16)}, "size"),
        ({"seed": -1}, "seed"),
        ({"ambiguous_share": -0.1}, "ambiguous_share"),
        ({"ambiguous_share": 1.5}, "ambiguous_share"),
        ({"positive_share": 0.0}, "positive_share"),
        ({"positive_share": 1.0}, "positive_share"),
        ({"classes": ("same", "same")}, "classes"),
    ],
)
def test_bad_arguments_name_the_argument(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} must"):
        generate_demo_dataset(tmp_path / "demo", **{"n": 4, "size": SIZE, **kwargs})
    assert not (tmp_path / "demo").exists()


def test_refuses_to_overwrite_an_existing_demo_set(tmp_path):
    generate_demo_dataset(tmp_path, n=2, size=(32, 32))
    with pytest.raises(FileExistsError, match=r"already there.*delete the folder"):
        generate_demo_dataset(tmp_path, n=2, size=(32, 32))


def test_never_writes_into_a_folder_holding_files_it_did_not_make(tmp_path):
    (tmp_path / "positive").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "positive" / "mine.png")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(FileExistsError, match=r"not empty and was not made by emotr"):
        generate_demo_dataset(tmp_path, n=2, size=(32, 32))
    assert sorted(tmp_path.rglob("*")) == before


def test_marks_the_folder_it_generates_and_finishes_its_own_interrupted_set(tmp_path):
    out = tmp_path / "demo"
    generate_demo_dataset(out, n=4, size=(32, 32))
    assert is_complete_demo_root(out)
    complete = {path.name: path.read_bytes() for path in out.rglob("*.jpg")}
    (out / "manifest.csv").unlink()  # as if the generator died before its last write
    (out / "positive" / "face_00099.jpg").write_bytes(b"half")  # a leftover of that run
    assert is_demo_root(out) and not is_complete_demo_root(out)
    generate_demo_dataset(out, n=4, size=(32, 32))
    assert {path.name: path.read_bytes() for path in out.rglob("*.jpg")} == complete
