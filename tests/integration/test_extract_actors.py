"""Extraction's actors across nodes and through kills, on a real local Ray: two (fake) GPU nodes
each run an extractor; a killed actor or a killed driver still ends with a complete cache."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray

from emotr.cache.maintenance import gc_cache, list_caches, verify_cache
from emotr.cache.store import FeatureCache
from emotr.config import Config
from emotr.config_io import to_yaml
from emotr.data.listing import list_images
from emotr.extract.backbone import FeatureExtractor
from emotr.extract.driver import extract_features
from tests.conftest import demo_config
from tests.run_cli import run_python
from tests.services import stop_processes, wait_for

pytestmark = pytest.mark.slow

# The slow model below is defined here; Ray workers cannot import this test module by name.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class SlowModel:
    """The configured extractor, slowed down per batch so that a run lasts long enough to kill."""

    def __init__(self, cfg, seconds_per_batch: float):
        self.model = FeatureExtractor(cfg)
        self.seconds = seconds_per_batch

    def __call__(self, pixels):
        time.sleep(self.seconds)  # sleeps, so the shared CPUs stay free
        return self.model(pixels)


def write_config(cfg: Config, path: Path) -> Path:
    path.write_text(to_yaml(cfg))
    return path


TWO_GPU_NODES = """
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from emotr.config_io import load_config
    from emotr.data.listing import list_images
    from emotr.extract.driver import extract_features
    from tests.integration.test_extract_actors import SlowModel

    cfg = load_config([sys.argv[1]])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1})
    cluster.add_node(num_cpus=2, num_gpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        # Slower than decoding, as VGG16 on a GPU node is: blocks queue up for both actors.
        summary = extract_features(cfg, list_images(cfg.data), progress=False,
                                   load_model=lambda: SlowModel(cfg.backbone, 0.3))
        print("RESULT", json.dumps({"workers": summary.rows_per_worker,
                                    "n_actors": summary.n_actors,
                                    "n_extracted": summary.n_extracted}))
    finally:
        ray.shutdown()
        cluster.shutdown()
"""


def test_two_gpu_nodes_each_run_an_extractor(tmp_path):
    # Fake GPUs: Ray schedules by them, TensorFlow runs on the CPU. A subprocess, because this
    # process already holds the shared local Ray.
    cfg = demo_config(tmp_path, "extract.batch_size=4", n=48)
    process = run_python(TWO_GPU_NODES, str(write_config(cfg, tmp_path / "cfg.yaml")))
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    result = json.loads(output.split("RESULT", 1)[1].splitlines()[0])
    assert result["n_actors"] == 2 and result["n_extracted"] == 48
    assert len(result["workers"]) == 2, result["workers"]
    assert all(count > 0 for count in result["workers"].values())
    assert sum(result["workers"].values()) == 48
    assert verify_cache(cfg.cache.root) == []
    [info] = list_caches(cfg.cache.root)
    assert info.n_rows == 48


def extractor_processes(root: psutil.Process) -> list[psutil.Process]:
    """The processes below root that run an extractor actor (by Ray's process title)."""
    found = []
    for process in root.children(recursive=True):
        try:
            if "Extractor" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:
            pass
    return found


def parts_in(cfg: Config) -> list[Path]:
    return list(Path(cfg.cache.root).glob("*/part-*.parquet"))


def test_killed_extractor_actor_still_ends_with_a_complete_cache(tmp_path, ray_local):
    cfg = demo_config(tmp_path, "extract.batch_size=4", n=40)
    listing = list_images(cfg.data)
    outcome: dict = {}

    def extract():
        try:
            outcome["summary"] = extract_features(
                cfg, listing, progress=False, load_model=lambda: SlowModel(cfg.backbone, 0.4)
            )
        except BaseException as error:  # handed to the test thread
            outcome["error"] = error

    # This extraction's actor, not an earlier test's that may still be ending in the shared Ray
    # (an idle worker Ray reuses is titled IDLE, so it is not among these).
    earlier = {process.pid for process in extractor_processes(psutil.Process())}
    thread = threading.Thread(target=extract)
    thread.start()
    wait_for("the first committed part", lambda: parts_in(cfg), 120)
    [victim] = wait_for(
        "the actor process",
        lambda: [p for p in extractor_processes(psutil.Process()) if p.pid not in earlier],
        30,
    )
    victim.kill()
    thread.join(timeout=300)
    assert "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    assert summary.n_extracted + summary.n_cached == 40
    assert FeatureCache.open(cfg.cache.root, summary.fingerprint).cached_hashes() == set(
        listing.images["sha256"]
    )
    assert verify_cache(cfg.cache.root) == []
    # The restarted actor is another process: two workers did the 40 rows (some maybe twice).
    assert len(summary.rows_per_worker) == 2 and sum(summary.rows_per_worker.values()) >= 40


DRIVER = """
    import sys
    import ray
    from emotr.config_io import load_config
    from emotr.data.listing import list_images
    from emotr.extract.driver import extract_features
    from tests.integration.test_extract_actors import SlowModel

    cfg = load_config([sys.argv[1]])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    extract_features(cfg, list_images(cfg.data), progress=False,
                     load_model=lambda: SlowModel(cfg.backbone, 0.5))
    print("FINISHED")
"""


def test_killed_driver_is_resumed_by_extracting_only_what_is_missing(tmp_path, ray_local):
    cfg = demo_config(tmp_path, "extract.batch_size=4", n=40)
    driver = run_python(DRIVER, str(write_config(cfg, tmp_path / "cfg.yaml")))
    try:
        wait_for("the first part", lambda: parts_in(cfg) or driver.poll() is not None, 180)
        assert driver.poll() is None, driver.communicate()[0][-3000:]
        helpers = psutil.Process(driver.pid).children(recursive=True)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        stop_processes([psutil.Process(driver.pid)] if driver.poll() is None else [], grace_s=0)
    stop_processes(helpers, grace_s=0)  # the driver's own Ray cluster, started by this test

    listing = list_images(cfg.data)
    # A kill during a commit leaves a _tmp file and nothing else: readers never see it.
    leftovers = verify_cache(cfg.cache.root)
    assert all("leftover of an interrupted commit" in problem for problem in leftovers)
    gc_cache(cfg.cache.root, min_age_s=0)
    n_before = len(FeatureCache.open(cfg.cache.root, parts_in(cfg)[0].parent.name).cached_hashes())
    assert 0 < n_before < 40

    summary = extract_features(cfg, listing, progress=False)
    assert summary.n_cached == n_before
    assert summary.n_extracted == 40 - n_before
    assert verify_cache(cfg.cache.root) == []
