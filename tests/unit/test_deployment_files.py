"""conf/cluster.yaml, docker/compose.yaml and docker/rayjob.yaml describe one deployment.

YAML level only (the images cannot be built here): the same service names, user, databases,
bucket, image and credential variables; published ports on 127.0.0.1; no secret value in a file.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest
import ray
import yaml

from emotr.config_io import load_config
from tests.conftest import REPO

DOCKER = REPO / "docker"
# What a component reads its credentials from (docs/cluster.md, "Credentials").
SECRET_VARIABLES = {"PGPASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load((DOCKER / "rayjob.yaml").read_text())


@pytest.fixture(scope="module")
def cluster():
    return load_config([REPO / "conf" / "cluster.yaml"])


def words(command: str | list[str]) -> list[str]:
    return command.split() if isinstance(command, str) else list(command)


def option(command: str | list[str], name: str) -> str:
    parts = words(command)
    return parts[parts.index(name) + 1]


def containers(rayjob: dict) -> dict[str, dict]:
    spec = rayjob["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return {c["name"]: c for pod in pods for c in pod["template"]["spec"]["containers"]}


def test_every_published_port_is_on_loopback(compose: dict):
    published = [port for service in compose.values() for port in service.get("ports", [])]
    assert published and all(port.startswith("127.0.0.1:") for port in published)


def test_no_file_holds_a_credential_value(compose: dict, rayjob: dict):
    for name, service in compose.items():
        for variable, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(variable):
                assert str(value).startswith("${"), f"{name}: {variable} has a literal value"
    for container in containers(rayjob).values():
        for variable in container["env"]:
            if SECRET_NAME.search(variable["name"]):
                assert "secretKeyRef" in variable.get("valueFrom", {}), variable["name"]


def test_cluster_config_names_the_compose_services(cluster, compose: dict):
    db = compose["postgres"]["environment"]
    storage = urlsplit(cluster.tune.storage)
    assert (storage.hostname, storage.port, storage.username) == (
        "postgres",
        5432,
        db["POSTGRES_USER"],
    )
    assert storage.password is None  # from PGPASSWORD or ~/.pgpass
    init_sql = (DOCKER / "postgres-init.sql").read_text()
    assert f"CREATE DATABASE {storage.path.strip('/')} " in init_sql

    mlflow = compose["mlflow"]["command"]
    tracking = urlsplit(cluster.mlflow.tracking_uri)
    assert (tracking.hostname, tracking.port) == ("mlflow", int(option(mlflow, "--port")))
    backend = urlsplit(option(mlflow, "--backend-store-uri"))
    assert (backend.hostname, backend.username) == ("postgres", db["POSTGRES_USER"])
    assert backend.path.strip("/") == db["POSTGRES_DB"] and backend.password is None
    assert cluster.mlflow.artifact_location.startswith("mlflow-artifacts:")  # via the server

    buckets = {
        urlsplit(uri).hostname
        for uri in (
            cluster.data.root,
            cluster.cache.root,
            option(mlflow, "--artifacts-destination"),
        )
    }
    created = re.findall(
        r"mc mb --ignore-existing local/(\S+)'", compose["minio-init"]["entrypoint"]
    )
    assert buckets == set(created) == {"emotr"}
    assert cluster.ray.address == "auto"


def test_compose_nodes_and_server_reach_minio_and_each_other(compose: dict):
    head, worker = compose["ray-head"], compose["ray-worker"]
    minio_port = option(compose["minio"]["command"], "--address").lstrip(":")
    for service in (head, worker, compose["mlflow"]):
        assert service["environment"]["AWS_ENDPOINT_URL"] == f"http://minio:{minio_port}"
    assert (
        compose["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == f"http://minio:{minio_port}"
    )
    assert option(worker["command"], "--address") == f"ray-head:{option(head['command'], '--port')}"
    assert "--block" in words(head["command"]) and "--block" in words(worker["command"])
    # Only the head runs the job's driver, the one process that opens the study.
    assert "PGPASSWORD" in head["environment"] and "PGPASSWORD" not in worker["environment"]
    assert {head["image"], worker["image"], compose["mlflow"]["image"]} == {"emotr:latest"}


def test_the_rayjob_runs_the_cluster_config_on_the_compose_image_and_credentials(
    rayjob: dict, compose: dict
):
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    entrypoint = words(rayjob["spec"]["entrypoint"])
    assert entrypoint[:2] == ["python", "/opt/emotr/jobs/run.py"]
    assert option(entrypoint, "-c") == "/opt/emotr/conf/cluster.yaml"
    assert "WORKDIR /opt/emotr" in (DOCKER / "Dockerfile").read_text()

    pods = containers(rayjob)
    assert {c["image"] for c in pods.values()} == {compose["ray-head"]["image"]}
    for name, service in (("ray-head", "ray-head"), ("ray-worker", "ray-worker")):
        env = {variable["name"]: variable for variable in pods[name]["env"]}
        assert set(env) == set(compose[service]["environment"]), name
        assert (
            env["AWS_ENDPOINT_URL"]["value"] == compose[service]["environment"]["AWS_ENDPOINT_URL"]
        )
    named = {v["name"] for pod in pods.values() for v in pod["env"] if "valueFrom" in v}
    assert named == SECRET_VARIABLES


def test_images_and_manifest_run_the_installed_ray(rayjob: dict):
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
    base = re.search(r"ARG BASE=rayproject/ray:(\S+)-py", (DOCKER / "Dockerfile").read_text())
    assert base is not None and base[1] == ray.__version__
