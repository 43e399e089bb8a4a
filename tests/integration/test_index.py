"""Extraction with the listing index: each image read once, on a worker; warm runs read nothing.

Reads are counted by a pyarrow filesystem over the real local one (tests/counting_fs.py), in the
driver and, through a Ray worker_process_setup_hook, in every worker of a driver process of its own.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import time
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
import pytest
from mlflow.tracking import MlflowClient

from emotr import pipeline
from emotr.config import DataConfig
from emotr.config_io import to_yaml
from emotr.data.index import index_location, read_index, scan_images, write_index
from emotr.data.listing import resolve_classes
from emotr.track import Tracker
from tests.conftest import demo_config, warns_in_log
from tests.run_cli import run_python

pytestmark = pytest.mark.slow

N_IMAGES = 24

# Four runs in one driver with its own Ray: cold, warm, one file's content changed, one renamed.
RUNS = """
    import json, shutil, sys
    from pathlib import Path
    import ray
    from PIL import Image
    import tests.counting_fs as counting
    from emotr import pipeline
    from emotr.config_io import load_config
    from emotr.extract.driver import extract_features

    cfg, log, out = load_config([sys.argv[1]]), sys.argv[2], Path(sys.argv[3])
    ray.cloudpickle.register_pickle_by_value(counting)
    counting.install(log)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": lambda: counting.install(log)})
    root = Path(cfg.data.root)
    images = sorted(root.rglob("*.jpg"))
    touched, renamed = images[3], images[7]

    def touch():
        Image.new("RGB", (80, 64), (1, 2, 3)).save(touched, "JPEG")

    def rename():
        renamed.rename(renamed.with_name("renamed.jpg"))

    results = {}
    for name, change in [("cold", None), ("warm", None), ("touch", touch), ("rename", rename)]:
        if change:
            change()
        Path(log).write_text("")
        scan = pipeline.prepare_scan(cfg)
        summary = extract_features(cfg, scan, progress=False)
        results[name] = {
            "unknown": scan.unknown()["path"].tolist(),
            "opened": counting.opened(log, root),
            "n_extracted": summary.n_extracted,
            "n_cached": summary.n_cached,
            "n_actors": summary.n_actors,
            "listing": summary.listing.images.to_dict("list"),
        }
    results["touched"], results["renamed"] = str(touched), str(renamed)
    out.write_text(json.dumps(results))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """What the four runs of RUNS did: hashes unknown, files opened, counts, the listing."""
    tmp_path = tmp_path_factory.mktemp("index-runs")
    cfg = demo_config(tmp_path, n=N_IMAGES)
    config = tmp_path / "cfg.yaml"
    config.write_text(to_yaml(cfg))
    out = tmp_path / "runs.json"
    process = run_python(RUNS, str(config), str(tmp_path / "opens.log"), str(out))
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    return {**json.loads(out.read_text()), "config": str(config)}


def hashes_by_path(listing: dict) -> dict[str, str]:
    return dict(zip(listing["path"], listing["sha256"], strict=True))


def test_a_cold_run_reads_each_image_once_on_a_worker(runs):
    cold = runs["cold"]
    listed = cold["listing"]["path"]
    assert len(listed) == N_IMAGES and sorted(cold["unknown"]) == sorted(listed)
    assert sorted(cold["opened"]) == sorted(listed)  # once each: hashed where decoded
    assert cold["n_extracted"] == N_IMAGES


def test_a_warm_rerun_reads_no_image_bytes_and_starts_no_actor(runs):
    warm = runs["warm"]
    assert warm["unknown"] == [] and warm["opened"] == []
    assert (warm["n_extracted"], warm["n_cached"], warm["n_actors"]) == (0, N_IMAGES, 0)
    assert warm["listing"] == runs["cold"]["listing"]


def test_touching_one_file_rehashes_and_reextracts_exactly_that_file(runs):
    touch = runs["touch"]
    assert touch["unknown"] == [runs["touched"]]
    assert touch["opened"] == [runs["touched"]]
    assert (touch["n_extracted"], touch["n_cached"]) == (1, N_IMAGES - 1)
    before = hashes_by_path(runs["cold"]["listing"])
    after = hashes_by_path(touch["listing"])
    changed = {path for path in after if after[path] != before[path]}
    assert changed == {runs["touched"]}


def test_a_renamed_file_reuses_its_features_and_keeps_its_split(runs):
    rename = runs["rename"]
    new_path = str(Path(runs["renamed"]).with_name("renamed.jpg"))
    assert rename["unknown"] == [new_path]
    assert rename["opened"] == [new_path]  # read to hash it, then not decoded: it is cached
    assert (rename["n_extracted"], rename["n_cached"]) == (0, N_IMAGES)
    old = pd.DataFrame(runs["touch"]["listing"]).set_index("path").loc[runs["renamed"]]
    new = pd.DataFrame(rename["listing"]).set_index("path").loc[new_path]
    assert (new["sha256"], new["split"]) == (old["sha256"], old["split"])


WARM_CLI = """
    import atexit, json, sys

    def report():
        ray = sys.modules.get("ray")
        started = {"tensorflow": "tensorflow" in sys.modules, "mlflow": "mlflow" in sys.modules,
                   "ray": bool(ray and ray.is_initialized())}
        print("STARTED", json.dumps(started), flush=True)

    atexit.register(report)
    sys.argv = ["emotr", "extract", "-c", sys.argv[1]]
    from emotr.cli.main import app
    app()
"""


def test_extract_command_with_nothing_to_do_starts_neither_ray_tensorflow_nor_mlflow(runs):
    process = run_python(WARM_CLI, runs["config"])
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    said = " ".join(output.split())  # the console wraps long lines
    assert f"0 extracted, {N_IMAGES} already cached, 0 failed" in said
    started = json.loads(output.split("STARTED", 1)[1].splitlines()[0])
    assert started == {"tensorflow": False, "mlflow": False, "ray": False}
    assert "nothing new to extract: no MLflow run recorded" in said


WRITER = """
    import sys
    import pandas as pd
    from emotr.data.index import write_index

    n = 1_000_000
    frame = pd.DataFrame({"location": [f"/data/img_{i:08d}.jpg" for i in range(n)],
                          "size": range(n), "mtime_ns": range(n),
                          "sha256": [f"{i:064x}" for i in range(n)]})
    print("WRITING", flush=True)
    while True:
        write_index(sys.argv[1], frame)
"""


def test_an_index_written_by_a_killed_driver_is_never_half_read(tmp_path):
    location = tmp_path / "cache" / "_listings" / "index.parquet"
    old = pd.DataFrame(
        {"location": ["/data/a.jpg"], "size": [1], "mtime_ns": [2], "sha256": ["f" * 64]}
    )
    write_index(str(location), old)
    writer = run_python(WRITER, str(location))
    try:
        assert writer.stdout.readline().strip() == "WRITING"
        deadline = time.monotonic() + 120
        while not list(location.parent.glob("_tmp-*")) and time.monotonic() < deadline:
            time.sleep(0.01)
        writer.send_signal(signal.SIGKILL)  # mid-write: its _tmp file is there
    finally:
        writer.kill()
        writer.wait(timeout=30)
    assert list(location.parent.glob("_tmp-*")), "the writer was not killed mid-write"

    index = read_index(str(location))

    # The old index, or a whole new one if a rename finished before the kill; never a part.
    assert len(index) in (1, 1_000_000)
    if len(index) == 1:
        pd.testing.assert_frame_equal(index, old)


def test_an_s3_data_root_is_listed_from_metadata_with_its_index_in_an_s3_cache(s3_bucket):
    filesystem, bucket = pafs.FileSystem.from_uri(s3_bucket)
    for index, name in enumerate(["negative/a.jpg", "negative/b.jpg", "positive/c.jpg"]):
        with filesystem.open_output_stream(f"{bucket}/data/{name}") as stream:
            stream.write(f"image {index}".encode())
    with filesystem.open_output_stream(f"{bucket}/data/positive/d.jpg") as stream:
        stream.write(b"image 3")
    data, cache = resolve_classes(DataConfig(root=f"{s3_bucket}/data")), f"{s3_bucket}/cache"
    assert data.classes == ("negative", "positive")  # the bucket's "folders": key prefixes

    cold = scan_images(data, cache)
    assert len(cold.unknown()) == 4
    listing = cold.complete_here()
    warm = scan_images(data, cache)

    assert warm.unknown().empty and warm.index_is_current
    assert warm.complete_here().digest == listing.digest
    assert listing.images["path"].str.startswith(f"{s3_bucket}/data/").all()
    index = index_location(cache, data).removeprefix("s3://")
    names = [
        info.base_name
        for info in filesystem.get_file_info(pafs.FileSelector(index.rsplit("/", 1)[0]))
    ]
    assert names == [index.rsplit("/", 1)[1]]  # published by copy; no _tmp key left

    with filesystem.open_output_stream(f"{bucket}/data/negative/b.jpg") as stream:
        # Another size: LastModified has 1 s resolution, so a same-size rewrite within the
        # second of the first write would look unchanged (emotr.data.index says so).
        stream.write(b"changed, and longer")
    changed = scan_images(data, cache).unknown()["path"].tolist()
    assert changed == [f"{s3_bucket}/data/negative/b.jpg"]


def test_conflicts_and_bad_files_hashed_on_workers_are_artifacts_of_the_run(
    tmp_path, ray_local, mlflow_server, caplog
):
    cfg = demo_config(
        tmp_path,
        "extract.max_failure_fraction=1.0",
        f"mlflow.tracking_uri={mlflow_server}",
        "mlflow.experiment=index-conflicts",
        n=N_IMAGES,
    )
    root = Path(cfg.data.root)
    original = sorted((root / "negative").glob("*.jpg"))[0]
    copy = root / "positive" / "copy.jpg"
    shutil.copy(original, copy)
    broken = root / "negative" / "broken.jpg"
    broken.write_bytes(b"not an image")
    tracker = Tracker(cfg.mlflow)

    with warns_in_log(caplog, "identical bytes"):
        summary = pipeline.extract(cfg, tracker, pipeline.prepare_scan(cfg))

    assert sorted(summary.listing.conflicts["path"]) == sorted([str(original), str(copy)])
    [failure] = summary.failures.itertuples()
    assert failure.path == str(broken)
    assert failure.sha256 == hashlib.sha256(b"not an image").hexdigest()
    assert "not an image" in failure.reason
    [run] = tracker.find_runs("attributes.run_name = 'extract'")
    client = MlflowClient(mlflow_server)
    out = tmp_path / "out"
    conflicts = pd.read_csv(client.download_artifacts(run.info.run_id, "data/conflicts.csv", out))
    assert sorted(conflicts["path"]) == sorted([str(original), str(copy)])
    failures = pd.read_csv(client.download_artifacts(run.info.run_id, "failures.csv", out))
    assert failures["sha256"].tolist() == [failure.sha256]
