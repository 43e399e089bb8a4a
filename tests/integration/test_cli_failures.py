"""The `emotr` command on a user's data and on failures, as a user runs it: a real subprocess."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.conftest import store_overrides
from tests.run_cli import emotr
from tests.services import free_port

pytestmark = pytest.mark.slow


def write_photos(root: Path, per_class: int = 3) -> None:
    """Real image files (JPEG and PNG) of noise, as a user's folder would hold."""
    rng = np.random.default_rng(0)
    for class_name in ("negative", "positive"):
        (root / class_name).mkdir(parents=True)
        for index in range(per_class):
            pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            suffix = "jpg" if index % 2 else "png"
            Image.fromarray(pixels).save(root / class_name / f"photo{index}.{suffix}")


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes() for path in root.rglob("*") if path.is_file()
    }


def test_demo_config_on_a_users_folder_adds_no_file_and_uses_those_images(tmp_path: Path):
    root = tmp_path / "emotions"
    write_photos(root)
    before = snapshot(root)
    result = emotr(
        "extract",
        "-c",
        "conf/demo.yaml",
        f"data.root={root}",
        "backbone.input_size=[32,32]",
        *store_overrides(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert snapshot(root) == before  # not one file added, changed or removed
    assert "6 extracted" in result.stdout
    assert "writing nothing there" in result.stderr.replace("\n", " ")


def test_an_unwritable_cache_fails_in_one_line_naming_the_key(tmp_path: Path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    args = [
        "extract",
        "-c",
        "conf/smoke.yaml",
        f"data.root={tmp_path / 'data'}",
        *store_overrides(tmp_path),
        f"cache.root={blocker / 'cache'}",
    ]
    result = emotr(*args)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    message = result.stderr.replace("\n", "")
    assert "cache.root=" in message and str(blocker) in message
    debug = emotr("--debug", *args)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_a_stray_cluster_file_does_not_capture_an_in_process_run(tmp_path: Path):
    # Ray's temp folder still names a cluster that is gone (a `ray start` stopped uncleanly).
    # A short folder: Ray's socket paths below it must fit in 107 bytes.
    ray_tmp = Path(tempfile.mkdtemp(prefix="emotr-ray-", dir="/tmp"))
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9\n")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        result = emotr(
            "run",
            "-c",
            "conf/smoke.yaml",
            f"data.root={tmp_path / 'data'}",
            "tune.n_trials=1",
            *store_overrides(tmp_path),
            env={**env, "RAY_TMPDIR": str(ray_tmp)},
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert result.returncode == 0, result.stderr
    assert "registered model" in " ".join(result.stdout.split())
    # Registration and the gate load Keras on the driver: TensorFlow's start-up lines stay held.
    for noise in ("oneDNN", "absl::", "cuInit", "cuda drivers"):
        assert noise not in result.stderr


def test_a_tracking_store_that_does_not_answer_stops_work_but_not_a_run_with_nothing_to_do(
    tmp_path: Path,
):
    root = tmp_path / "emotions"
    write_photos(root)
    port = free_port()  # a port nobody listens on
    args = ["extract", "-c", "conf/smoke.yaml", f"data.root={root}", *store_overrides(tmp_path)]
    down = [*args, f"mlflow.tracking_uri=http://127.0.0.1:{port}"]

    failed = emotr(*down)  # work to do: the check runs while Ray starts, and stops the job
    assert failed.returncode == 1, failed.stdout + failed.stderr
    said = failed.stderr.replace("\n", " ")
    assert "tracking" in said and f"127.0.0.1:{port}" in said and "fix:" in said
    assert "extracted" not in failed.stdout
    assert not list((tmp_path / "cache").rglob("part-*"))  # nothing extracted

    assert emotr(*args).returncode == 0  # the store answers: 6 extracted and recorded
    idle = emotr(*down)  # nothing left to do: the store is not needed, nor asked
    assert idle.returncode == 0, idle.stderr
    assert "nothing new to extract" in idle.stdout.replace("\n", " ")


@pytest.fixture(scope="module")
def run_with_a_conflict(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """`emotr run` (its output captured, as `> log` would) on demo images plus one file copied
    under the other label; its tracking store and registered model are under the root."""
    root = tmp_path_factory.mktemp("run-conflict")
    data = root / "data"
    made = emotr("demo-data", str(data), "--n", "24", "--size", "64x80")
    assert made.returncode == 0, made.stderr
    original = sorted((data / "negative").iterdir())[0]
    shutil.copy(original, data / "positive" / f"copy{original.suffix}")
    result = emotr(
        "run",
        "-c",
        "conf/smoke.yaml",
        f"data.root={data}",
        "data.generate_demo=false",
        *store_overrides(root),
    )
    assert result.returncode == 0, result.stderr
    return root, data, result


def test_a_run_in_a_log_shows_the_top_trials_whole_and_a_conflict_as_one_log_line(
    run_with_a_conflict,
):
    _, _, result = run_with_a_conflict
    table = result.stdout[result.stdout.index("Top 3 trials") :]
    assert len(re.findall(r"\b0\.\d{4}\b|\b1\.0000\b", table)) >= 3  # three objectives, whole
    assert "…" not in table
    assert "finetune" not in table and "ft lr" not in table  # equal in every trial: left out
    [line] = [line for line in result.stderr.splitlines() if "identical bytes" in line]
    assert "WARNING emotr.data.listing: 1 image(s) have identical bytes" in line
    assert line.rstrip().endswith("(every path is in data/conflicts.csv of the run)")
    assert "UserWarning" not in result.stderr and "warnings.warn" not in result.stderr


def test_predict_takes_overrides_a_second_tracking_store_among_them(
    run_with_a_conflict, tmp_path: Path
):
    root, data, _ = run_with_a_conflict
    other = tmp_path / "other.yaml"  # a config whose tracking store holds no model
    other.write_text(
        f"mlflow:\n  tracking_uri: sqlite:///{tmp_path / 'empty.db'}\n"
        f"  artifact_location: {tmp_path / 'mlartifacts'}\ncache:\n  root: {root / 'cache'}\n"
    )
    images = [str(path) for path in sorted((data / "positive").iterdir())[:2]]
    uri = f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}"

    found = emotr("predict", "-c", str(other), uri, *images, "--output", str(tmp_path / "p.csv"))
    assert found.returncode == 0, found.stderr
    assert "2 images, 0 could not be read" in found.stdout
    assert len(pd.read_csv(tmp_path / "p.csv")) == 2

    missing = emotr("predict", "-c", str(other), *images)  # its own store: no model there
    assert missing.returncode == 1
    assert "no version or alias 'champion'" in " ".join(missing.stderr.split())

    misspelled = emotr("predict", "-c", str(other), "mlflow.tracking_ur=x", *images)
    assert misspelled.returncode == 2
    assert "mlflow.tracking_ur: unknown key; did you mean mlflow.tracking_uri?" in misspelled.stderr
