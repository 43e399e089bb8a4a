"""The Ray extraction pipeline end to end: real files, a real local Ray, a real mlflow server."""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import io
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import ray
from mlflow.tracking import MlflowClient
from PIL import Image

from emotr import pipeline
from emotr.cache.maintenance import list_caches, verify_cache
from emotr.cache.store import FeatureCache
from emotr.config import Config, MlflowConfig
from emotr.data.demo import generate_demo_dataset
from emotr.data.listing import Listing, list_images
from emotr.extract.backbone import FeatureExtractor
from emotr.extract.dataset import _ProgressLog
from emotr.extract.driver import TooManyFailures, extract_features
from emotr.track import Tracker
from tests.conftest import REPO, decoded, demo_config, smoke_config
from tests.run_cli import RAY_NOISE

pytestmark = pytest.mark.slow

# The unloadable model below is defined here; Ray workers cannot import this module by name.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def listing_of(paths: list[Path]) -> Listing:
    """A Listing of files as they are now (what list_images returns for good folders)."""
    rows = [
        (str(path), 0, "negative", hashlib.sha256(path.read_bytes()).hexdigest(), "train")
        for path in paths
    ]
    images = pd.DataFrame(rows, columns=["path", "label", "class_name", "sha256", "split"])
    return Listing(images=images, conflicts=images.iloc[:0], digest="test")


def cached_rows(cfg: Config, fingerprint: str) -> pd.DataFrame:
    parts = sorted((Path(cfg.cache.root) / fingerprint).glob("part-*.parquet"))
    return pd.concat([pq.read_table(part).to_pandas() for part in parts], ignore_index=True)


def cache_of(cfg: Config, summary) -> FeatureCache:
    return FeatureCache.open(cfg.cache.root, summary.fingerprint)


# The tutorial's backbone and input handling: each reaches the actors and the decode tasks.
TUTORIAL = ("backbone.name=vgg19", "backbone.preprocess=rescale", "decode.resize=nearest")


@pytest.mark.parametrize("overrides", [(), TUTORIAL], ids=["default", "tutorial"])
def test_pipeline_features_equal_a_single_process_extractor(tmp_path, ray_local, overrides):
    cfg = demo_config(tmp_path, *overrides)
    listing = list_images(cfg.data)
    summary = extract_features(cfg, listing, progress=False)
    assert (summary.n_extracted, summary.n_failed, summary.n_cached) == (24, 0, 0)

    expected = FeatureExtractor(cfg.backbone)(decoded(cfg, listing.images["path"]))
    got = cache_of(cfg, summary).load(listing.images["sha256"].tolist())
    assert got.shape == (24, 512)
    assert np.abs(got - expected).max() <= 1e-4
    assert np.abs(expected).max() > 0  # random weights, but not a dead network
    parts = cached_rows(cfg, summary.fingerprint)
    assert set(parts["height"]) == {64} and set(parts["width"]) == {80}
    assert verify_cache(cfg.cache.root) == []


def test_actors_run_the_configured_keras_backend(tmp_path, ray_local):
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed (pip install -e '.[dev]' installs it)")
    compiled = tmp_path / "jax-cache"
    cfg = demo_config(
        tmp_path, "extract.keras_backend=jax", f"extract.compilation_cache_dir={compiled}", n=8
    )
    listing = list_images(cfg.data)
    summary = extract_features(cfg, listing, progress=False)
    assert summary.n_extracted == 8
    assert summary.rows_per_worker and all(
        worker.endswith(":jax") for worker in summary.rows_per_worker
    ), summary.rows_per_worker
    # The compiled model was kept for the next actor start.
    assert compiled.is_dir() and any(compiled.iterdir())
    # Same fingerprint and, within float tolerance, the same features as TensorFlow.
    expected = FeatureExtractor(cfg.backbone)(decoded(cfg, listing.images["path"]))
    got = cache_of(cfg, summary).load(listing.images["sha256"].tolist())
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=1e-4)


def test_a_backend_missing_on_the_workers_fails_with_what_to_do(tmp_path, ray_local):
    if importlib.util.find_spec("torch") is not None:
        pytest.skip("torch is installed here, so the missing-backend error cannot happen")
    cfg = demo_config(tmp_path, "extract.keras_backend=torch", n=4)
    with pytest.raises(Exception, match=r"extract.keras_backend=torch, but torch is not installed"):
        extract_features(cfg, list_images(cfg.data), progress=False)


def _unloadable_model():
    raise FileNotFoundError("weights file /nowhere/vgg16.weights.h5 is gone")


def test_a_model_that_cannot_load_fails_the_run_with_its_reason(tmp_path, ray_local):
    # The model loads in the background of the actor's start: its error must still end the run.
    cfg = demo_config(tmp_path, n=4)
    with pytest.raises(Exception, match=re.escape("/nowhere/vgg16.weights.h5 is gone")):
        extract_features(cfg, list_images(cfg.data), progress=False, load_model=_unloadable_model)
    assert not list(Path(cfg.cache.root).rglob("part-*.parquet"))


def test_rerun_extracts_only_new_images_and_a_new_input_size_gets_its_own_folder(
    tmp_path, ray_local
):
    cfg = demo_config(tmp_path)
    first = extract_features(cfg, list_images(cfg.data), progress=False)
    assert first.n_extracted == 24

    again = extract_features(cfg, list_images(cfg.data), progress=False)
    assert (again.n_extracted, again.n_cached, again.n_actors) == (0, 24, 0)

    extra = generate_demo_dataset(tmp_path / "extra", n=10, size=(64, 80), seed=7)
    for index, path in enumerate(sorted(extra.manifest.parent.rglob("*.jpg"))):
        shutil.copy(path, Path(cfg.data.root) / path.parent.name / f"extra_{index}.jpg")
    more = extract_features(cfg, list_images(cfg.data), progress=False)
    assert (more.n_images, more.n_cached, more.n_extracted) == (34, 24, 10)

    bigger = smoke_config(tmp_path, "backbone.input_size=[64,64]")
    other = extract_features(bigger, list_images(bigger.data), progress=False)
    assert other.fingerprint != first.fingerprint
    assert other.n_extracted == 34
    rows = {info.fingerprint: info.n_rows for info in list_caches(cfg.cache.root)}
    assert rows == {first.fingerprint: 34, other.fingerprint: 34}
    assert verify_cache(cfg.cache.root) == []


def test_a_new_manifest_over_cached_images_says_only_the_new_ones_are_extracted(
    tmp_path, ray_local, caplog
):
    cfg = demo_config(tmp_path, n=8)
    assert extract_features(cfg, list_images(cfg.data), progress=False).n_extracted == 8
    # A manifest the listing index has never seen: every file's hash is unknown until read.
    generate_demo_dataset(tmp_path / "extra", n=2, size=(64, 80), seed=7)
    paths = sorted(Path(cfg.data.root).rglob("*.jpg")) + sorted((tmp_path / "extra").rglob("*.jpg"))
    manifest = tmp_path / "new.csv"
    labels = [path.parent.name for path in paths]
    pd.DataFrame({"path": map(str, paths), "label": labels}).to_csv(manifest, index=False)
    cfg = pipeline.resolve_data(demo_config(tmp_path, f"data.manifest={manifest}", n=8))
    scan = pipeline.prepare_scan(cfg)
    assert len(scan.unknown()) == 10

    with caplog.at_level(logging.INFO, logger="emotr.extract.driver"):
        summary = extract_features(cfg, scan, progress=False)

    assert (summary.n_images, summary.n_cached, summary.n_extracted) == (10, 8, 2)
    said = [r.getMessage() for r in caplog.records if r.name == "emotr.extract.driver"]
    assert not any("of 10 images" in line for line in said), said
    assert any(
        line.startswith("reading 10 files of unknown hash (the cached ones are skipped")
        and "extracting gap5 of those the cache lacks" in line
        for line in said
    ), said
    assert any(
        line.startswith("extracted gap5 of 2 images (0 failed)")
        and line.endswith("8 of the 10 files of unknown hash were cached already")
        for line in said
    ), said


def png_chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def write_mixed_folder(folder: Path) -> tuple[list[Path], list[Path]]:
    """Good images in many formats and modes, and bad files of every kind; returns (good, bad)."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8))
    grey16 = Image.fromarray(rng.integers(0, 65536, (64, 80)).astype(np.uint16))
    rotated = rgb.getexif()
    rotated[0x0112] = 6  # EXIF orientation: rotate 90 degrees to display upright
    good = {
        "rgb.jpg": encode(rgb, "JPEG"),
        "grey.jpg": encode(rgb.convert("L"), "JPEG"),
        "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG"),
        "rotated.jpg": encode(rgb, "JPEG", exif=rotated.tobytes()),
        "rgba.png": encode(rgb.convert("RGBA"), "PNG"),
        "palette.png": encode(rgb.convert("P"), "PNG", transparency=0),
        "grey_alpha.png": encode(rgb.convert("LA"), "PNG"),
        "grey16.png": encode(grey16, "PNG"),
        "animated.gif": encode(
            rgb.convert("P"), "GIF", save_all=True, append_images=[rgb.rotate(90).convert("P")]
        ),
        "image.bmp": encode(rgb, "BMP"),
        "image.webp": encode(rgb, "WEBP"),
        "image.tiff": encode(rgb, "TIFF"),
    }
    jpeg = good["rgb.jpg"]
    signature = b"\x89PNG\r\n\x1a\n"
    huge_header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0))
    bad = {
        "empty.jpg": b"",
        "text.jpg": b"this is a text file with a .jpg name\n",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "garbage.png": signature + rng.integers(0, 256, 2000, dtype=np.uint8).tobytes(),
        "huge.png": signature + huge_header + png_chunk(b"IEND", b""),
    }
    folder.mkdir(parents=True)
    for name, data in {**good, **bad}.items():
        (folder / name).write_bytes(data)
    return [folder / n for n in good], [folder / n for n in bad]


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    return write_mixed_folder(tmp_path_factory.mktemp("mixed") / "images")


def tracker_for(uri: str, tmp_path: Path, experiment: str) -> Tracker:
    return Tracker(
        MlflowConfig(
            tracking_uri=uri, experiment=experiment, artifact_location=str(tmp_path / "artifacts")
        )
    )


def failures_artifact(uri: str, run_id: str, tmp_path: Path) -> pd.DataFrame:
    path = MlflowClient(uri).download_artifacts(run_id, "failures.csv", str(tmp_path))
    return pd.read_csv(path)


def test_bad_files_are_recorded_and_every_good_image_is_cached(
    tmp_path, ray_local, mlflow_server, mixed_folder
):
    good, bad = mixed_folder
    listing = listing_of([*good, *bad])
    cfg = smoke_config(tmp_path, "extract.max_failure_fraction=1.0")
    tracker = tracker_for(mlflow_server, tmp_path, "extract-bad-files")

    summary = pipeline.extract(cfg, tracker, listing)

    assert summary.n_extracted == len(good)
    assert summary.n_unique == len(good) + len(bad)
    assert set(summary.failures["path"]) == {str(path) for path in bad}
    reasons = dict(zip(summary.failures["path"], summary.failures["reason"], strict=True))
    assert all(reasons.values())
    assert "too many pixels" in reasons[str(bad[-1])]
    cache = cache_of(cfg, summary)
    good_hashes = listing.images["sha256"][: len(good)].tolist()
    assert cache.cached_hashes() == set(good_hashes)
    parts = cached_rows(cfg, summary.fingerprint)
    sizes = {row.sha256: (row.height, row.width) for row in parts.itertuples()}
    assert sizes[listing.images["sha256"][3]] == (80, 64)  # rotated.jpg, upright
    assert verify_cache(cfg.cache.root) == []

    [run] = tracker.find_runs("attributes.run_name = 'extract'")
    assert run.info.status == "FINISHED"
    assert run.data.metrics["n_failed"] == len(bad)
    assert run.data.metrics["n_extracted"] == len(good)
    assert {"images_per_second", "wall_seconds", "n_cached", "n_images"} <= set(run.data.metrics)
    assert run.data.params["fingerprint"] == summary.fingerprint
    logged = failures_artifact(mlflow_server, run.info.run_id, tmp_path)
    assert set(logged["path"]) == {str(path) for path in bad}


def test_changed_file_is_a_failure_with_its_reason(tmp_path, ray_local):
    path = tmp_path / "photo.png"
    path.write_bytes(encode(Image.new("RGB", (64, 80), "red"), "PNG"))
    listing = listing_of([path])
    path.write_bytes(encode(Image.new("RGB", (64, 80), "blue"), "PNG"))
    cfg = smoke_config(tmp_path, "extract.max_failure_fraction=1.0")
    summary = extract_features(cfg, listing, progress=False)
    assert summary.n_extracted == 0
    assert "changed since it was listed" in summary.failures["reason"][0]


def test_too_many_failures_fails_the_run_after_caching_the_good_images(
    tmp_path, ray_local, mlflow_server, mixed_folder
):
    good, bad = mixed_folder
    listing = listing_of([*good, *bad])
    cfg = smoke_config(tmp_path, "extract.max_failure_fraction=0.1")
    tracker = tracker_for(mlflow_server, tmp_path, "extract-too-many-failures")

    with pytest.raises(TooManyFailures) as raised:
        pipeline.extract(cfg, tracker, listing)

    message = str(raised.value)
    assert f"{len(bad)} of {len(good) + len(bad)} images" in message
    assert "extract.max_failure_fraction" in message
    cache = cache_of(cfg, raised.value.summary)
    assert cache.cached_hashes() == set(listing.images["sha256"][: len(good)])
    [run] = tracker.find_runs("attributes.run_name = 'extract'")
    assert run.info.status == "FAILED"
    assert "TooManyFailures" in run.data.tags["error"]
    assert run.data.metrics["n_failed"] == len(bad)
    logged = failures_artifact(mlflow_server, run.info.run_id, tmp_path)
    assert set(logged["path"]) == {str(path) for path in bad}


def test_extract_module_knows_nothing_of_tracking():
    # Compute modules return what they did; pipeline.py logs it. Type-checking imports count too.
    sources = sorted((REPO / "emotr" / "extract").glob("*.py"))  # the room: one module before
    tree = ast.Module([node for path in sources for node in ast.parse(path.read_text()).body], [])
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {name for name in imported if name.startswith(("emotr.track", "mlflow"))}


# What TensorFlow, absl, CUDA probing and Keras' progress bars print when left alone.
NOISE = re.compile(
    r"oneDNN|cpu_feature_guard|\bcuda|cuInit|cuDNN|TensorRT|absl|^[IWE]0000 |━|\d+m?s/step",
    re.IGNORECASE,
)
PROGRESS = re.compile(r"extract: (\d+)/24 images")


def test_progress_lines_come_every_tenth_or_when_the_interval_has_passed(caplog):
    caplog.set_level(logging.INFO, logger="emotr.extract")
    by_fraction = _ProgressLog(total=95, every_s=1e9)
    for n_done in range(1, 96):
        by_fraction.update(n_done, n_failed=0)
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 10 and lines[0].startswith("extract: 10/95 images (10%)")
    assert lines[-1].startswith("extract: 95/95 images (100%)")

    caplog.clear()
    by_time = _ProgressLog(total=1000, every_s=0.0)
    for n_done in (1, 2, 3):
        by_time.update(n_done, n_failed=1)
    assert [r.getMessage().split(",")[0] for r in caplog.records] == [
        "extract: 1/1000 images (0%)",
        "extract: 2/1000 images (0%)",
        "extract: 3/1000 images (0%)",
    ]


@pytest.fixture(scope="module")
def extract_console(tmp_path_factory) -> str:
    """What a real `emotr extract` on the smoke config prints when its output is a pipe."""
    return _run_extract(tmp_path_factory.mktemp("console"))


@pytest.fixture(scope="module")
def extract_debug_console(tmp_path_factory) -> str:
    """The same with --debug, and Ray left to choose its authentication mode (and warn)."""
    return _run_extract(
        tmp_path_factory.mktemp("debug_console"), "--debug", drop=("RAY_AUTH_MODE",)
    )


def _run_extract(root: Path, *options: str, drop: tuple[str, ...] = ()) -> str:
    paths = [
        f"data.root={root / 'data'}",
        f"cache.root={root / 'cache'}",
        f"tune.storage=sqlite:///{root / 'optuna.db'}",
        f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
        f"mlflow.artifact_location={root / 'mlartifacts'}",
    ]
    # Its own Ray: no RAY_ADDRESS.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", *drop)}
    command = [
        sys.executable,
        "-m",
        "emotr.cli",
        *options,
        "extract",
        "-c",
        str(REPO / "conf" / "smoke.yaml"),
    ]
    done = subprocess.run(
        [*command, *paths], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    return output


def test_extract_command_logs_progress_and_no_tensorflow_or_keras_noise(extract_console):
    noise = [line for line in extract_console.splitlines() if NOISE.search(line)]
    assert not noise, "\n".join(noise)
    counts = [int(found[1]) for found in PROGRESS.finditer(extract_console)]
    assert len(counts) >= 2 and counts[-1] == 24, extract_console[-3000:]
    assert "MEANINGLESS" in extract_console  # the random-weights warning still reaches the user


# Ray's lines on a healthy run's console: token authentication's warning and "Generated new
# authentication token", "Started a local Ray instance", Ray Data's start, plan and finish of
# each dataset, and the core worker's native line about actor constructor arguments (ray#57733).
def test_extract_command_prints_no_ray_start_up_data_plan_or_core_worker_lines(extract_console):
    noise = [line for line in extract_console.splitlines() if RAY_NOISE.search(line)]
    assert not noise, "\n".join(noise)


def test_debug_shows_the_ray_lines_a_healthy_run_hides(extract_debug_console):
    for line in ("Token authentication is enabled", "Execution plan of Dataset", "core_worker.cc"):
        assert line in extract_debug_console, extract_debug_console[-3000:]
