"""emotr serve's parts that need no running Serve: references, clock ticks, the serve section,
request bodies, batches of two versions, and the files `emotr serve --build` writes."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import yaml
from fastapi import HTTPException
from ray.serve.schema import ServeDeploySchema
from starlette.requests import Request

from emotr.config import ConfigError
from emotr.config_io import load_config
from emotr.serve.app import ServerSettings, deployment_options
from emotr.serve.batching import BatchItem, PassQueue, batch_outputs
from emotr.serve.launch import check_replica_fits, serve_config, served_refs, write_build
from emotr.serve.uploads import Limits, invocation_images, read_uploads
from emotr.serve.versions import (
    ModelRef,
    ServedVersion,
    ServeError,
    parse_model_ref,
    seconds_to_next_tick,
)
from tests.conftest import REPO


def test_a_model_reference_is_an_alias_a_version_or_a_registry_uri():
    assert parse_model_ref(None, "emotr", "champion") == ModelRef("emotr", "champion")
    assert parse_model_ref("3", "emotr", "champion") == ModelRef("emotr", "3")
    assert parse_model_ref("models:/other@best", "emotr", "champion") == ModelRef("other", "best")
    assert parse_model_ref("models:/other/4", "emotr", "champion").uri == "models:/other/4"
    assert ModelRef("emotr", "champion").follows and not ModelRef("emotr", "4").follows
    with pytest.raises(ServeError, match="registered versions"):
        parse_model_ref("runs:/abc/model", "emotr", "champion")
    with pytest.raises(ServeError, match="models:/NAME@ALIAS"):
        parse_model_ref("models:/", "emotr", "champion")


def test_replicas_share_clock_ticks():
    assert seconds_to_next_tick(12.5, 10.0) == pytest.approx(7.5)
    assert seconds_to_next_tick(20.0, 10.0) == pytest.approx(10.0)
    # Two replicas that look 3 s apart within one period wake at the same instant.
    assert 101.0 + seconds_to_next_tick(101.0, 10.0) == 104.0 + seconds_to_next_tick(104.0, 10.0)


def test_the_serve_section_is_checked_at_start_up():
    with pytest.raises(ConfigError, match="min_replicas 3 is above max_replicas 2"):
        load_config([], ["serve.autoscaling={min_replicas: 3, max_replicas: 2}"])
    with pytest.raises(ConfigError, match=r"serve\.port"):
        load_config([], ["serve.port=70000"])
    with pytest.raises(ConfigError, match=r"serve\.route_prefix"):
        load_config([], ["serve.route_prefix=api"])


def test_replicas_or_an_autoscaling_range_become_serves_options():
    fixed = deployment_options(load_config([], ["serve.replicas=2"]).serve)
    scaled = deployment_options(
        load_config([], ["serve.autoscaling={min_replicas: 1, max_replicas: 3}"]).serve
    )
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert scaled["autoscaling_config"]["max_replicas"] == 3 and "num_replicas" not in scaled
    assert fixed["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0}


def test_the_challenger_is_left_out_when_it_is_the_served_reference():
    cfg = load_config([], [])
    assert served_refs(cfg, None) == (
        ModelRef("emotr", "champion"),
        ModelRef("emotr", "challenger"),
    )
    assert served_refs(cfg, "challenger") == (ModelRef("emotr", "challenger"), None)
    with pytest.raises(ServeError, match="not the served"):
        served_refs(load_config([], ["serve.challenger=models:/other@x"]), None)


class ScaledSum:
    """A stand-in scorer: one 'VGG pass' = the pixels' sum times a factor; counts its passes."""

    def __init__(self, factor: float):
        self.factor, self.passes = factor, []

    def extractor(self, pixels: np.ndarray) -> np.ndarray:
        self.passes.append(len(pixels))
        return pixels.reshape(len(pixels), -1).sum(axis=1, keepdims=True).astype(float)

    def score_features(self, features: np.ndarray) -> np.ndarray:
        return np.hstack([features * self.factor, -features * self.factor])


def served_version(factor: float) -> ServedVersion:
    return ServedVersion(ModelRef("m", "champion"), "1", ("a", "b"), "run", {}, ScaledSum(factor))


def test_a_batch_runs_one_pass_per_version_and_keeps_each_request_with_its_version():
    old, new = served_version(1.0), served_version(10.0)
    pixels = [np.full((2, 2, 3), value, dtype=np.uint8) for value in (1, 2, 3, 4)]
    items = [
        BatchItem(version, image, explain=False)
        for version, image in zip([old, new, old, new], pixels, strict=True)
    ]

    answers = batch_outputs(items)

    assert [a[0] for a in answers] == [12.0, 240.0, 36.0, 480.0]
    assert old.scorer.passes == [2] and new.scorer.passes == [2]


class Passes:
    """A pass that records its items and holds until released: requests arrive meanwhile."""

    def __init__(self):
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()

    async def run(self, items: list[int]) -> list[int]:
        self.batches.append(items)
        await self.release.wait()
        if -1 in items:
            raise ValueError("a broken pass")
        return [10 * item for item in items]


def test_a_pass_takes_every_item_that_waited_for_the_pass_before():
    async def scenario():
        passes = Passes()
        queue = PassQueue(passes.run, max_batch_size=4)
        first = asyncio.create_task(queue.submit([1], 0.0))
        await asyncio.sleep(0.05)  # the first pass runs; five requests arrive one by one
        later = []
        for item in range(2, 7):
            later.append(asyncio.create_task(queue.submit([item], 0.0)))
            await asyncio.sleep(0.02)
        passes.release.set()
        return passes.batches, await first, await asyncio.gather(*later)

    batches, first, later = asyncio.run(scenario())

    assert batches == [[1], [2, 3, 4, 5], [6]]
    assert first == [10] and later == [[20], [30], [40], [50], [60]]


def test_a_failed_pass_answers_its_requests_and_a_timed_out_request_leaves_the_queue():
    async def scenario():
        passes = Passes()
        queue = PassQueue(passes.run, max_batch_size=8)
        broken = asyncio.create_task(queue.submit([-1, 2], 0.0))
        await asyncio.sleep(0.05)
        gone = asyncio.create_task(asyncio.wait_for(queue.submit([3], 0.0), 0.05))
        kept = asyncio.create_task(queue.submit([4], 0.0))
        with pytest.raises(TimeoutError):
            await gone
        passes.release.set()
        with pytest.raises(ValueError, match="a broken pass"):
            await broken
        return passes.batches, await kept

    batches, kept = asyncio.run(scenario())

    assert batches == [[-1, 2], [4]] and kept == [40]


def test_a_pass_waits_for_company_only_as_long_as_its_first_item_says():
    async def scenario():
        passes = Passes()
        passes.release.set()
        queue = PassQueue(passes.run, max_batch_size=8)
        lone = await queue.submit([1], 0.0)
        first = asyncio.create_task(queue.submit([2], 0.5))
        await asyncio.sleep(0.05)
        second = await queue.submit([3], 0.0)
        return passes.batches, lone, await first, second

    batches, lone, first, second = asyncio.run(scenario())

    assert batches == [[1], [2, 3]] and (lone, first, second) == ([10], [20], [30])


def test_a_replica_bigger_than_every_node_is_refused_with_the_most_it_can_ask():
    nodes = [
        {"Alive": True, "Resources": {"CPU": 2.0, "memory": 1e9}},
        {"Alive": False, "Resources": {"CPU": 16.0, "GPU": 1.0}},  # a dead node counts for none
    ]
    cfg = load_config(None).serve

    check_replica_fits(cfg.model_copy(update={"cpus_per_replica": 2.0}), nodes)
    with pytest.raises(ServeError, match=r"serve.cpus_per_replica=4: .* largest node has 2; .*"
                       r"serve.cpus_per_replica=2"):  # fmt: skip
        check_replica_fits(cfg.model_copy(update={"cpus_per_replica": 4.0}), nodes)
    with pytest.raises(ServeError, match=r"serve.gpus_per_replica=1: .* has 0"):
        check_replica_fits(cfg.model_copy(update={"gpus_per_replica": 1.0}), nodes)


def test_mlflows_scoring_formats_give_the_image_values():
    split = {"dataframe_split": {"columns": ["image"], "data": [["aGk="], ["eA=="]]}}
    records = {"dataframe_records": [{"image": "aGk="}]}
    instances = {"instances": ["aGk=", "eA=="]}
    assert invocation_images(json.dumps(split).encode()) == ["aGk=", "eA=="]
    assert invocation_images(json.dumps(records).encode()) == ["aGk="]
    assert invocation_images(json.dumps(instances).encode()) == ["aGk=", "eA=="]
    for body, reason in [
        (b"{not json", "not JSON"),
        (b'{"dataframe_split": {"columns": ["path"], "data": [["/etc/passwd"]]}}', "`path`s"),
        (b'{"columns": ["image"]}', "dataframe_split"),
        (b'{"dataframe_records": []}', "no rows"),
    ]:
        with pytest.raises(HTTPException, match=reason) as raised:
            invocation_images(body)
        assert raised.value.status_code == 400


def request_of(body: bytes, headers: dict[str, str], chunk: int = 1024) -> Request:
    """A Starlette request whose body arrives in chunks, as from a real connection."""
    parts = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
    messages = [
        {"type": "http.request", "body": part, "more_body": i < len(parts) - 1}
        for i, part in enumerate(parts)
    ]

    async def receive():
        return messages.pop(0)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/predict",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    return Request(scope, receive)


def multipart(files: list[tuple[str, bytes]], boundary: str = "emotr") -> bytes:
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n".encode()
        + data
        + b"\r\n"
        for name, data in files
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


def uploads_of(body: bytes, headers: dict[str, str], limits: Limits):
    return asyncio.run(read_uploads(request_of(body, headers), limits))


def test_uploads_are_read_within_the_limits():
    limits = Limits(max_bytes=4096, max_files=2)
    form = {"content-type": "multipart/form-data; boundary=emotr"}
    files = [("a.jpg", b"\xff\xd8one"), ("b.jpg", b"\xff\xd8two")]

    read = uploads_of(multipart(files), form, limits)

    assert [(u.name, u.data) for u in read] == files
    assert (
        uploads_of(b"\xff\xd8raw", {"content-type": "image/jpeg"}, limits)[0].data == b"\xff\xd8raw"
    )
    refused = [
        (multipart(files * 2), form, 413, "max_files"),
        (multipart([("big.jpg", b"x" * 5000)]), form, 413, "max_upload_mb"),  # no length given
        (b"x" * 10, {"content-type": "image/png", "content-length": "99999"}, 413, "max_upload"),
        (b"", {}, 400, "no image"),
        (multipart([]), form, 400, "no image"),
        (b"{}", {"content-type": "application/json"}, 415, "/invocations"),
    ]
    for body, headers, status, reason in refused:
        with pytest.raises(HTTPException, match=reason) as raised:
            uploads_of(body, headers, limits)
        assert raised.value.status_code == status


def test_the_built_serve_config_is_valid_for_serve_deploy(tmp_path):
    cfg = load_config([], [f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db"])
    path = tmp_path / "serve.yaml"

    assert write_build(cfg, "champion", path) == "Serve config"

    written = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(written)  # Ray's own schema of `serve deploy` files
    (app,) = written["applications"]
    assert app["import_path"] == "emotr.serve.app:build_app"
    settings = ServerSettings.model_validate(app["args"]["settings"])
    assert settings.model_ref == "champion" and settings.tracking_uri.startswith("sqlite:////")
    assert written["http_options"]["host"] == "127.0.0.1"


def test_docker_rayservice_serves_what_cluster_yaml_builds(tmp_path):
    manifest = yaml.safe_load((REPO / "docker" / "rayservice.yaml").read_text())
    cluster = load_config([REPO / "conf" / "cluster.yaml"])

    assert manifest["kind"] == "RayService"
    assert yaml.safe_load(manifest["spec"]["serveConfigV2"]) == serve_config(cluster, None)
    copy = tmp_path / "rayservice.yaml"
    copy.write_text((REPO / "docker" / "rayservice.yaml").read_text())
    assert write_build(cluster, None, copy) == "RayService"
    assert yaml.safe_load(copy.read_text()) == manifest  # rebuilding changes nothing
