"""`emotr explain`'s and the MLflow grids' small decisions: which images a grid shows, which
output folders are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from emotr.insight.explain import ExplainError, check_output_dir
from emotr.insight.grids import WORST_ERRORS, choose_images, confident_artifact

CLASSES = ("negative", "positive")


def test_grids_show_the_highest_loss_errors_and_the_most_confident_correct_images():
    p_positive = np.array([0.9, 0.2, 0.6, 0.99, 0.4, 0.05, np.nan, 0.7])
    proba = np.column_stack([1 - p_positive, p_positive])
    labels = np.array([0, 1, 0, 1, 1, 0, 1, 1])

    worst, negative, positive = choose_images(proba, labels, 0.5, 2, CLASSES)

    # Errors: rows 0 (loss -log 0.1), 1 (-log 0.2), 2 (-log 0.4), 4 (-log 0.4); the top two.
    assert worst.artifact == WORST_ERRORS and worst.rows.tolist() == [0, 1]
    assert "2 of 4" in worst.title
    assert negative.artifact == confident_artifact("negative") and negative.rows.tolist() == [5]
    assert positive.rows.tolist() == [3, 7]  # row 6 has no score (a file that did not decode)


def test_a_class_name_makes_a_safe_artifact_name():
    assert confident_artifact("very happy/sad") == "explain/confident_very_happy_sad.png"


def test_output_folder_inside_an_input_folder_or_a_file_is_refused(tmp_path: Path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (tmp_path / "taken.txt").write_text("x")
    with pytest.raises(ExplainError, match="inside the input folder"):
        check_output_dir(photos / "explained", [str(photos)])
    with pytest.raises(ExplainError, match="is a file"):
        check_output_dir(tmp_path / "taken.txt", [str(photos)])
    check_output_dir(tmp_path / "explained", [str(photos), str(tmp_path / "one.jpg")])
