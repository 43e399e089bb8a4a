"""The `emotr` command as a user runs it: a real subprocess, real files, exit codes and messages."""

from pathlib import Path

import pytest
from PIL import Image

from tests.run_cli import emotr


@pytest.mark.parametrize(
    ("override", "key"),
    [("tune.n_trials=abc", "tune.n_trials"), ("tune.n_trails=3", "tune.n_trails")],
)
def test_bad_override_fails_before_any_work_naming_the_key(override, key):
    result = emotr("run", "-c", "conf/demo.yaml", override)
    assert result.returncode == 2
    assert key in result.stderr
    assert "Traceback" not in result.stderr


def test_data_root_with_an_empty_class_folder_names_that_folder(tmp_path: Path):
    root = tmp_path / "data"
    (root / "negative").mkdir(parents=True)
    (root / "positive" / "nested").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(root / "negative" / "a.png")
    (root / "positive" / "notes.txt").write_text("not an image")
    result = emotr(
        "extract",
        "-c",
        "conf/smoke.yaml",
        f"data.root={root}",
        "data.generate_demo=false",
        f"cache.root={tmp_path / 'cache'}",
    )
    assert result.returncode == 1
    assert str(root / "positive") in result.stderr.replace("\n", "")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["demo-data", "extract", "tune", "run", "promote", "predict"])
def test_every_subcommand_documents_itself(command):
    result = emotr(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout


def test_demo_data_writes_both_classes_and_prints_the_ceiling(tmp_path: Path):
    result = emotr(
        "demo-data", str(tmp_path / "demo"), "--n", "6", "--size", "64x80", "--seed", "3"
    )
    assert result.returncode == 0, result.stderr
    assert "Bayes ceiling" in result.stdout
    assert any((tmp_path / "demo" / "negative").iterdir())
    assert any((tmp_path / "demo" / "positive").iterdir())
    again = emotr("demo-data", str(tmp_path / "demo"), "--n", "6")
    assert again.returncode == 2 and "demo" in again.stderr


@pytest.mark.slow
@pytest.mark.skipif(
    (Path.home() / ".keras/models/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5").exists(),
    reason="ImageNet weights are cached here, so nothing fails",
)
def test_unreachable_imagenet_weights_fail_with_the_alternatives(tmp_path: Path):
    result = emotr(
        "extract",
        "-c",
        "conf/smoke.yaml",
        "backbone.weights=imagenet",
        f"data.root={tmp_path / 'data'}",
        f"cache.root={tmp_path / 'cache'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"mlflow.artifact_location={tmp_path / 'mlartifacts'}",
    )
    assert result.returncode == 1
    assert "backbone.weights=hed-bsds500" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "cache").rglob("part-*.parquet"))
