"""emotr predict's inputs and outputs: folders, manifests, the --output file (no Ray, no model)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from emotr.config_io import load_config
from emotr.deploy.predict import (
    PredictError,
    check_output,
    list_inputs,
    model_uri,
    write_predictions,
)


def _frame(start: int, n: int) -> pd.DataFrame:
    bad = [i % 7 == 0 for i in range(start, start + n)]
    return pd.DataFrame(
        {
            "path": [f"/images/{i}.jpg" for i in range(start, start + n)],
            "p_negative": [float("nan") if b else 0.75 for b in bad],
            "p_positive": [float("nan") if b else 0.25 for b in bad],
            "label": pd.Series([None if b else "negative" for b in bad], dtype=object),
            "error": pd.Series(["not an image" if b else None for b in bad], dtype=object),
        }
    )


def test_inputs_from_folders_manifests_and_files(tmp_path: Path):
    (tmp_path / "photos" / "deeper").mkdir(parents=True)
    for name in ("b.jpg", "a.PNG", "deeper/c.jpeg", "notes.txt"):
        (tmp_path / "photos" / name).write_bytes(b"x")
    manifest = tmp_path / "lists" / "todo.csv"
    manifest.parent.mkdir()
    pd.DataFrame({"path": ["rel.jpg", "/abs/x.jpg"], "label": ["a", "b"]}).to_csv(manifest)

    paths = list_inputs([tmp_path / "photos", manifest, tmp_path / "missing.jpg"])

    photos = tmp_path / "photos"
    assert paths == [
        str(photos / "a.PNG"),
        str(photos / "b.jpg"),
        str(photos / "deeper" / "c.jpeg"),
        str(manifest.parent / "rel.jpg"),  # relative to the manifest's folder
        "/abs/x.jpg",
        str(tmp_path / "missing.jpg"),  # becomes a row with its reason
    ]


def test_a_manifest_without_path_column_names_what_it_has(tmp_path: Path):
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"file": ["a.jpg"]}).to_csv(manifest, index=False)
    with pytest.raises(PredictError, match=r"m.csv has no `path` column; found \['file'\]"):
        list_inputs([manifest])


def test_parquet_output_streams_batches_into_row_groups_in_order(tmp_path: Path):
    output = tmp_path / "out" / "rows.parquet"
    batches = [_frame(start, 32) for start in range(0, 32 * 200, 32)]  # 6,400 rows

    summary = write_predictions(iter(batches), output)

    rows = pd.read_parquet(output)
    assert summary.n_images == len(rows) == 6400
    assert summary.n_failed == int(rows["error"].notna().sum()) == len(range(0, 6400, 7))
    assert rows["path"].tolist() == [f"/images/{i}.jpg" for i in range(6400)]
    assert pq.ParquetFile(output).metadata.num_row_groups == 2  # not one per batch of 32


def test_csv_output_has_one_header_and_an_empty_run_still_writes_it(tmp_path: Path):
    output = tmp_path / "rows.csv"
    write_predictions(iter([_frame(0, 3), _frame(3, 4)]), output)
    rows = pd.read_csv(output)
    assert list(rows.columns) == ["path", "p_negative", "p_positive", "label", "error"]
    assert len(rows) == 7

    empty = tmp_path / "empty.csv"
    assert write_predictions(iter([]), empty).n_images == 0
    assert empty.read_text().strip() == "path,p_negative,p_positive,label,error"


def test_output_format_is_checked_before_any_work(tmp_path: Path):
    with pytest.raises(PredictError, match=r"rows.json must end with .parquet or .csv"):
        check_output(tmp_path / "rows.json")
    assert not (tmp_path / "rows.json").exists()


def test_model_option_names_a_uri_a_version_or_an_alias():
    cfg = load_config([], ["registry.model_name=faces"])
    assert model_uri(cfg, None) == "models:/faces@champion"
    assert model_uri(cfg, "3") == "models:/faces/3"
    assert model_uri(cfg, "challenger") == "models:/faces@challenger"
    assert model_uri(cfg, "runs:/abc/model") == "runs:/abc/model"
