"""The label audit's parts on synthetic feature matrices: out-of-fold probabilities, cleanlab's
ranking, near-duplicate pairs (blocked as the full matrix), near-blank similarity, the gallery."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from emotr.config import AuditConfig, DecodeConfig
from emotr.data.listing import list_images
from emotr.insight.audit import (
    AuditError,
    audit_listing,
    audit_metrics,
    blank_similarity,
    fold_units,
    near_duplicate_pairs,
    out_of_fold_probabilities,
    out_of_fold_table,
    pair_table,
    rank_label_issues,
    standardised,
)
from emotr.insight.audit_report import gallery_png
from emotr.insight.blanks import BLANK_COLOURS, blank_png
from tests.conftest import smoke_config, store_overrides, write_class_folders
from tests.run_cli import emotr

CLASSES = ("angry", "happy", "sad")


def clusters(n_per_class: int = 60, dim: int = 32, spread: float = 1.0, seed: int = 0):
    """Separable Gaussian clusters (non-negative, as pooled VGG features are) and their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 4, (len(CLASSES), dim))
    labels = np.repeat(np.arange(len(CLASSES)), n_per_class)
    x = centres[labels] + rng.normal(0, spread, (len(labels), dim))
    return np.abs(x).astype(np.float32), labels


def images_of(labels: np.ndarray) -> pd.DataFrame:
    n = len(labels)
    return pd.DataFrame(
        {
            "path": [f"/data/{CLASSES[label]}/img_{i:03d}.png" for i, label in enumerate(labels)],
            "sha256": [f"{i:064x}" for i in range(n)],
            "split": np.where(np.arange(n) % 5 == 0, "val", "train").astype(object),
            "label": labels,
            "class_name": [CLASSES[label] for label in labels],
        }
    )


def test_planted_flipped_labels_are_the_top_suspects():
    x, truth = clusters()
    rng = np.random.default_rng(1)
    flipped = rng.choice(len(truth), 9, replace=False)
    given = truth.copy()
    given[flipped] = (truth[flipped] + 1) % len(CLASSES)
    probabilities = out_of_fold_probabilities(x, given, len(CLASSES), AuditConfig())
    assert probabilities.shape == (len(x), len(CLASSES))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
    table = out_of_fold_table(images_of(given), probabilities, CLASSES)
    issues = rank_label_issues(table, given, probabilities)
    top = issues.head(len(flipped))
    planted = set(images_of(given)["path"].iloc[flipped])
    # cleanlab flags what its estimated noise rates allow (here 7 of the 9): those are planted.
    assert len(set(top["path"]) & planted) >= 6
    assert len(set(top["path"]) - planted) <= 1
    assert issues["rank"].tolist() == list(range(1, len(issues) + 1))
    assert issues["self_confidence"].is_monotonic_increasing
    # The suggestion is the true class, and the self-confidence is P(given label).
    by_path = table.set_index("path")
    for row in top.itertuples():
        index = images_of(given)["path"].tolist().index(row.path)
        assert row.suggested == CLASSES[truth[index]]
        assert row.given == CLASSES[given[index]]
        assert row.self_confidence == pytest.approx(by_path.loc[row.path, f"p_{row.given}"])
    metrics = audit_metrics(given, probabilities, len(issues), pair_table(images_of(given), *(
        np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))), 0)  # fmt: skip
    assert metrics["n_images"] == len(x)
    assert metrics["label_issue_rate"] == pytest.approx(len(issues) / len(x))
    assert 0.9 < metrics["oof_accuracy"] < 1.0  # the flipped ones are scored as their true class
    assert metrics["oof_macro_auc"] > 0.9


def test_copies_stay_in_one_fold():
    # Ten images, each twice (identical bytes under two paths): a copy in another fold would
    # vouch for its twin's flipped label; with the copies kept together it is caught.
    x, truth = clusters(n_per_class=20)
    x = np.concatenate([x, x[:10]])
    given = np.concatenate([truth, truth[:10]])
    given[[0, 60]] = 1  # image 0 and its copy (row 60), both flipped from class 0
    images = images_of(given)
    images.loc[60:, "sha256"] = images["sha256"].iloc[:10].to_numpy()
    images["group"] = None
    units = fold_units(images)
    probabilities = out_of_fold_probabilities(x, given, len(CLASSES), AuditConfig(), units)
    issues = rank_label_issues(
        out_of_fold_table(images, probabilities, CLASSES), given, probabilities
    )
    assert {images["path"][0], images["path"][60]} <= set(issues["path"].head(4))


def test_classes_smaller_than_the_folds_are_refused():
    x, labels = clusters(n_per_class=3)
    with pytest.raises(AuditError, match=r"audit.folds=5 needs .* lower audit.folds"):
        out_of_fold_probabilities(x, labels, len(CLASSES), AuditConfig(folds=5))


def test_near_duplicates_within_and_across_classes():
    x, labels = clusters(n_per_class=40, dim=64, spread=2.0)
    rng = np.random.default_rng(2)
    # Row 1 a near copy of row 0 (same class); row 80 (class 2) a near copy of row 45 (class 1).
    x[1] = x[0] * 1.02 + rng.normal(0, 0.01, x.shape[1])
    x[80] = x[45] + rng.normal(0, 0.01, x.shape[1])
    i, j, similarity = near_duplicate_pairs(standardised(x), 0.98)
    assert sorted(zip(i.tolist(), j.tolist(), strict=True)) == [(0, 1), (45, 80)]
    assert (similarity >= 0.98).all()
    table = pair_table(images_of(labels), i, j, similarity)
    by_pair = table.set_index(["path_a", "path_b"])["same_label"]
    paths = images_of(labels)["path"]
    assert by_pair[(paths[0], paths[1])]
    assert not by_pair[(paths[45], paths[80])]
    assert table["similarity"].is_monotonic_decreasing
    metrics = audit_metrics(labels, np.eye(3)[labels], 0, table, 0)
    assert metrics["n_near_duplicate_pairs"] == 2
    assert metrics["n_near_duplicate_pairs_across_labels"] == 1


def test_raw_pooled_features_would_all_look_alike():
    # Why near-duplicates are found on standardised features: non-negative features with a big
    # common part have a raw cosine near 1 for every pair.
    x = clusters(n_per_class=20, dim=64)[0] + 20.0
    assert len(near_duplicate_pairs(x, 0.98)[0]) > 1000
    assert len(near_duplicate_pairs(standardised(x), 0.98)[0]) == 0


@pytest.mark.parametrize("block_rows", [1, 7, 64, 1000])
def test_blocks_give_the_pairs_of_the_full_matrix(block_rows):
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (150, 3)).astype(np.float32)  # few dimensions: many similar pairs
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    full = unit @ unit.T
    expected = {(a, b) for a, b in zip(*np.nonzero(full >= 0.9), strict=True) if a < b}
    i, j, similarity = near_duplicate_pairs(x, 0.9, block_rows=block_rows)
    assert set(zip(i.tolist(), j.tolist(), strict=True)) == expected
    assert len(i) == len(expected) > 100
    np.testing.assert_allclose(similarity, full[i, j], atol=1e-5)


def test_blank_similarity_names_the_closest_reference():
    references = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], np.float32)
    x = np.array([[2.0, 0.01, 0.0], [0.0, 3.0, 2.9], [1.0, 1.0, 0.0]], np.float32)
    similarity, nearest = blank_similarity(x, references)
    assert nearest.tolist() == [0, 1, 0]
    assert similarity[0] > 0.99 and similarity[1] > 0.99 and similarity[2] < 0.8


def test_blank_pngs_are_uniform_and_stable():
    first = blank_png(BLANK_COLOURS["grey"], (24, 32))
    assert first == blank_png(BLANK_COLOURS["grey"], (24, 32))  # one sha256 per colour and size
    pixels = np.asarray(Image.open(io.BytesIO(first)))
    assert pixels.shape == (24, 32, 3) and (pixels == 128).all()


def test_the_gallery_shows_every_suspect(tmp_path):
    paths = []
    for index in range(3):
        path = tmp_path / f"img_{index}.png"
        Image.new("RGB", (40, 30), (index * 80, 20, 200)).save(path)
        paths.append(str(path))
    paths.append(str(tmp_path / "gone.png"))  # deleted since the listing: a grey square
    issues = pd.DataFrame(
        {
            "rank": [1, 2, 3, 4],
            "path": paths,
            "given": ["sad", "happy", "sad", "angry"],
            "suggested": ["happy", "sad", "angry", "sad"],
            "self_confidence": [0.001, 0.01, 0.2, 0.3],
        }
    )
    png = gallery_png(issues, DecodeConfig())
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.width > 4 * 100


def test_images_not_in_the_cache_say_to_extract_first(tmp_path):
    cfg = smoke_config(tmp_path, "data.generate_demo=false")
    write_class_folders(Path(cfg.data.root), classes=cfg.data.classes, n_per_class=6, size=8)
    listing = list_images(cfg.data)
    n_audited = len(listing.train()) + len(listing.val())
    with pytest.raises(AuditError, match=rf"{n_audited} of {n_audited} train/val images have no "
                       r"features .* run `emotr extract -c FILE`"):  # fmt: skip
        audit_listing(cfg, listing)


def test_the_command_says_to_extract_first(tmp_path):
    root = tmp_path / "data"
    write_class_folders(root, classes=("negative", "positive"), n_per_class=6, size=8)
    result = emotr(
        "audit",
        "-c",
        "conf/smoke.yaml",
        f"data.root={root}",
        "data.generate_demo=false",
        *store_overrides(tmp_path),
    )
    assert result.returncode == 1, result.stdout + result.stderr
    said = " ".join(result.stderr.split())
    assert "train/val images have no features in the cache" in said
    assert "run `emotr extract -c FILE`" in said and "Traceback" not in said
