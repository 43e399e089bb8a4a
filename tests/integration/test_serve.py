"""`emotr serve` on the shared local Ray: a real registered version behind Ray Serve, called over
HTTP as users call it (curl's multipart uploads, MLflow's scoring protocol), its answers compared
with mlflow.pyfunc's, every bad input answered and followed by a good request, and a promotion
followed while requests run."""

from __future__ import annotations

import base64
import io
import itertools
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
import requests
import yaml
from PIL import Image

from emotr import pipeline
from emotr.deploy.package import register_model
from emotr.deploy.promote import point_champion
from emotr.deploy.registry import fluent_store
from emotr.serve.launch import start_serving, stop_serving
from emotr.track import Tracker
from tests.conftest import shuffled_label_candidate, smoke_config
from tests.run_cli import RAY_NOISE, emotr
from tests.services import free_port

pytestmark = pytest.mark.slow

MODEL = "emotr-serve"


@contextmanager
def served_model(root: Path, mlflow_server: str, model: str, *overrides: str):
    """A smoke `emotr run` of `model` (version 1: champion and challenger) served by `emotr
    serve`'s code on the shared local Ray; Serve shut down after."""
    from ray import serve

    cfg = smoke_config(
        root,
        f"mlflow.tracking_uri={mlflow_server}",
        f"mlflow.experiment={model}",
        f"registry.model_name={model}",
        "data.demo_n=40",
        f"serve.port={free_port()}",
        "serve.follow_s=1",
        "serve.cpus_per_replica=0.5",
        *overrides,
    )
    tracker = Tracker(cfg.mlflow)
    result = pipeline.run(cfg, tracker, pipeline.prepare_listing(cfg))
    started = start_serving(cfg, None)
    try:
        yield SimpleNamespace(cfg=cfg, tracker=tracker, result=result, started=started)
    finally:
        stop_serving(cfg.serve)
        serve.shutdown()


@pytest.fixture(scope="module")
def served(tmp_path_factory, ray_local, mlflow_server):
    """MODEL served with small upload limits."""
    root = tmp_path_factory.mktemp("serve")
    limits = ("serve.max_upload_mb=1", "serve.max_files=4")
    with served_model(root, mlflow_server, MODEL, *limits) as running:
        yield running


def jpeg(seed: int, size=(60, 48)) -> bytes:
    """A real JPEG file's bytes (random pixels: any image is a valid input)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def pyfunc_rows(
    tracker: Tracker, version: str, images: list[bytes], model_name: str = MODEL
) -> pd.DataFrame:
    """The registered version's answer through mlflow.pyfunc, as a user loads it."""
    with fluent_store(tracker):
        model = mlflow.pyfunc.load_model(f"models:/{model_name}/{version}")
    return model.predict(pd.DataFrame({"image": images}))


def post_files(url: str, files: list[tuple[str, bytes]], **params) -> requests.Response:
    fields = [("file", (name, data, "image/jpeg")) for name, data in files]
    return requests.post(f"{url}/predict", files=fields, params=params, timeout=60)


def test_predict_answers_uploaded_files_as_the_pyfunc_model_does(served):
    images = [jpeg(1), jpeg(2), jpeg(3)]

    answer = post_files(
        served.started.url, [(f"photo{i}.jpg", data) for i, data in enumerate(images)]
    )

    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model"] == {
        "name": MODEL,
        "version": served.result.model_version,
        "alias": "champion",
    }
    assert answer.headers["X-Emotr-Version"] == served.result.model_version
    rows = pd.DataFrame(body["rows"])
    assert list(rows["file"]) == ["photo0.jpg", "photo1.jpg", "photo2.jpg"]
    expected = pyfunc_rows(served.tracker, served.result.model_version, images)
    for column in ("p_negative", "p_positive"):
        np.testing.assert_allclose(rows[column].astype(float), expected[column].astype(float),
                                   atol=1e-6)  # fmt: skip
    assert list(rows["label"]) == list(expected["label"])
    assert rows["error"].isna().all()


def test_invocations_speaks_mlflows_scoring_protocol(served):
    images = [jpeg(4), b"not an image"]
    payload = {
        "dataframe_split": {
            "columns": ["image"],
            "data": [[base64.b64encode(data).decode()] for data in images],
        }
    }

    answer = requests.post(f"{served.started.url}/invocations", json=payload, timeout=60)

    assert answer.status_code == 200, answer.text
    predictions = pd.DataFrame(answer.json()["predictions"])
    expected = pyfunc_rows(served.tracker, served.result.model_version, images)
    np.testing.assert_allclose(
        predictions["p_positive"][:1].astype(float), expected["p_positive"][:1].astype(float),
        atol=1e-6,
    )  # fmt: skip
    assert predictions["error"][1] == expected["error"][1]
    assert predictions["error"][1].startswith("not an image")


def test_healthz_and_version_describe_what_answers(served):
    health = requests.get(f"{served.started.url}/healthz", timeout=10)
    version = requests.get(f"{served.started.url}/version", timeout=10).json()

    assert health.status_code == 200 and health.json()["status"] == "ready"
    assert version["version"] == served.result.model_version and version["alias"] == "champion"
    assert version["classes"] == ["negative", "positive"]
    assert version["tags"]["feature_fingerprint"] and version["run_id"]


def test_request_counts_and_images_reach_rays_prometheus_endpoint(served):
    post_files(served.started.url, [("a.jpg", jpeg(9)), ("b.jpg", b"no image")])
    wanted = (
        "ray_serve_num_http_requests_total",
        "ray_emotr_images_total{",
        'outcome="unreadable"',
    )
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline and not all(name in text for name in wanted):
        time.sleep(2)  # Ray exports what its processes recorded every few seconds
        text = requests.get(served.started.metrics, timeout=10).text
    assert all(name in text for name in wanted), text[-2000:]


def test_each_bad_input_gets_its_status_and_reason_and_the_replica_goes_on(served):
    url, good = served.started.url, [("good.jpg", jpeg(5))]
    bomb = io.BytesIO()
    Image.new("1", (12_000, 10_000)).save(bomb, format="PNG")  # 1.2e8 pixels in a few KB
    text = [("notes.jpg", b"a text file renamed .jpg\n")]
    cases = {
        "text renamed .jpg": (lambda: post_files(url, text), 422, "not an image"),
        "too many pixels": (
            lambda: post_files(url, [("bomb.png", bomb.getvalue())]),
            422,
            "pixels",
        ),
        "empty body": (lambda: requests.post(f"{url}/predict", timeout=30), 400, "no image"),
        "a form without a file": (
            lambda: requests.post(f"{url}/predict", data={"note": "hi"}, timeout=30),
            400,
            "no image",
        ),
        "over max_upload_mb": (
            lambda: post_files(url, [("big.jpg", b"\xff" * (2 * 2**20))]),
            413,
            "max_upload_mb",
        ),
        "over max_upload_mb, no Content-Length": (
            lambda: requests.post(
                f"{url}/predict",
                data=(b"\xff" * 2**16 for _ in range(40)),  # chunked: 2.5 MB
                headers={"Content-Type": "image/jpeg"},
                timeout=30,
            ),
            413,
            "max_upload_mb",
        ),
        "over max_files": (lambda: post_files(url, good * 5), 413, "max_files"),
        "JSON to /predict": (
            lambda: requests.post(f"{url}/predict", json={"a": 1}, timeout=30),
            415,
            "/invocations",
        ),
        "an unknown model": (lambda: post_files(url, good, model="other"), 400, "challenger"),
        "invocations without image": (
            lambda: requests.post(
                f"{url}/invocations",
                json={"dataframe_split": {"columns": ["path"], "data": [["/etc/passwd"]]}},
                timeout=30,
            ),
            400,
            "`image`",
        ),
    }
    for name, (send, status, reason) in cases.items():
        answer = send()
        assert answer.status_code == status, f"{name}: {answer.status_code} {answer.text}"
        assert reason in answer.text, f"{name}: {answer.text}"
        after = post_files(url, good)
        assert after.status_code == 200, f"after {name}: {after.text}"


def test_a_lone_image_runs_at_once_and_a_request_that_times_out_is_answered_504(served):
    # A second application behind the same proxy whose batches wait 60 s for a full batch, with
    # a 5 s timeout: one image of the only request in flight does not wait for company; two
    # images wait for the batch and cannot be answered in time.
    slow = served.cfg.serve.model_copy(
        update={
            "app_name": "emotr-slow",
            "route_prefix": "/slow",
            "max_batch_size": 64,
            "batch_wait_s": 60.0,
            "request_timeout_s": 5.0,
            "challenger": None,
        }
    )
    slow_cfg = served.cfg.model_copy(update={"serve": slow})
    slow_url = start_serving(slow_cfg, None).url
    try:
        lone = post_files(slow_url, [("a.jpg", jpeg(6))])
        assert lone.status_code == 200, lone.text
        pair = post_files(slow_url, [("a.jpg", jpeg(6)), ("b.jpg", jpeg(9))])
        assert pair.status_code == 504, pair.text
        assert "serve.request_timeout_s (5 s)" in pair.text
        assert post_files(served.started.url, [("a.jpg", jpeg(6))]).status_code == 200
    finally:
        stop_serving(slow)


def test_the_challenger_answers_beside_the_champion(served):
    answer = post_files(served.started.url, [("a.jpg", jpeg(7))], model="challenger")

    assert answer.status_code == 200, answer.text
    assert answer.json()["model"]["alias"] == "challenger"


def test_a_promotion_is_followed_with_no_failed_or_mixed_request(served):
    first = served.tracker.client.get_model_version(MODEL, served.result.model_version)
    second = register_model(
        served.cfg, served.tracker, shuffled_label_candidate(served.cfg, served.tracker, first)
    ).version
    image = jpeg(8)
    answers: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            answer = post_files(served.started.url, [("a.jpg", image)])
            version = answer.json()["model"]["version"] if answer.ok else None
            answers.append((answer.status_code, version))

    client = threading.Thread(target=load)
    client.start()
    try:
        time.sleep(2)
        moved = time.monotonic()
        point_champion(served.cfg, served.tracker, str(second))
        while time.monotonic() - moved < 30 and (not answers or answers[-1][1] != str(second)):
            time.sleep(0.2)
        followed_after = time.monotonic() - moved
        time.sleep(1)
    finally:
        stop.set()
        client.join()
        point_champion(served.cfg, served.tracker, served.result.model_version)

    assert all(status == 200 for status, _ in answers), answers
    versions = [version for _, version in answers]
    switches = sum(a != b for a, b in itertools.pairwise(versions))
    assert versions[0] == served.result.model_version and versions[-1] == str(second), versions
    assert switches == 1 and followed_after < 30
    rows = post_files(served.started.url, [("a.jpg", image)], model="challenger").json()["rows"]
    expected = pyfunc_rows(served.tracker, str(second), [image])
    assert rows[0]["p_positive"] == pytest.approx(float(expected["p_positive"][0]), abs=1e-6)


def test_the_serve_command_refuses_a_busy_port_says_where_it_serves_and_stops(served, tmp_path):
    config = tmp_path / "serve.yaml"
    port = free_port()
    cfg = served.cfg.model_copy(
        update={"serve": served.cfg.serve.model_copy(update={"port": port})}
    )
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))

    wrong = emotr("serve", "-c", str(config), "--model", "99", timeout=120)
    assert wrong.returncode == 1
    assert f"model '{MODEL}' has no version or alias '99'" in wrong.stderr

    with socket.socket() as taken:  # a port another server holds: refused, named
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        refused = emotr("serve", "-c", str(config), f"serve.port={busy}", timeout=120)
    assert refused.returncode == 1 and f"something already listens on 127.0.0.1:{busy}" in (
        refused.stderr
    )

    command = [sys.executable, "-m", "emotr.cli", "serve", "-c", str(config)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in process.stdout:  # until it says that Ctrl-C stops it
            lines.append(line)
            if "Ctrl-C" in line:
                break
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10).ok
        process.send_signal(signal.SIGTERM)  # as a process manager stops it; Ctrl-C alike
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    console = "".join(lines) + out + err
    assert process.returncode == 0, console
    assert f"version {served.result.model_version}" in lines[0]
    assert f"http://127.0.0.1:{port}" in lines[0] and "stopped" in out
    noise = [line for line in console.splitlines() if RAY_NOISE.search(line) or "INFO" in line]
    assert not noise, console
