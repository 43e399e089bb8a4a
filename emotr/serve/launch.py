"""Start, stop and write down `emotr serve`'s application: on the Ray the CLI connected to, or as
files for `serve deploy` and KubeRay (`emotr serve --build FILE`).

Ray Serve is imported inside the functions that start or stop it: `--build` needs none of it.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import yaml

from emotr.config import Config, ServeConfig
from emotr.deploy.registry import open_registry
from emotr.serve.versions import ModelRef, ServeError, parse_model_ref, resolve_version

IMPORT_PATH = "emotr.serve.app:build_app"
DEPLOYMENT = "EmotrServer"
# Serve's proxy gives up after this long beyond serve.request_timeout_s (a replica answers 504
# itself at serve.request_timeout_s; the proxy's 408 is the backstop when a replica is stuck).
PROXY_MARGIN_S = 30.0


@dataclass(frozen=True)
class Started:
    """A running application: where it answers, what it serves."""

    url: str
    served: ModelRef
    version: str  # the version the served reference named at start
    challenger: ModelRef | None
    metrics: str | None  # this node's Prometheus endpoint (Ray's metrics export port)


def served_refs(cfg: Config, model: str | None) -> tuple[ModelRef, ModelRef | None]:
    """The reference served (--model, else serve.model, else the champion alias) and the
    challenger's (serve.challenger; none when it is the served one)."""
    registry = cfg.registry
    main = parse_model_ref(model or cfg.serve.model, registry.model_name, registry.champion_alias)
    if cfg.serve.challenger is None:
        return main, None
    challenger = parse_model_ref(cfg.serve.challenger, main.name, registry.challenger_alias)
    if challenger.name != main.name:
        raise ServeError(
            f"serve.challenger {cfg.serve.challenger!r} names model {challenger.name!r}, not the "
            f"served {main.name!r}: give an alias or version of {main.name!r}"
        )
    return main, (None if challenger == main else challenger)


def http_options(cfg: ServeConfig) -> dict[str, Any]:
    """Serve's HTTP proxy options: where it listens, how long it waits for a replica."""
    return {
        "host": cfg.host,
        "port": cfg.port,
        "request_timeout_s": cfg.request_timeout_s + PROXY_MARGIN_S,
    }


def local_url(cfg: ServeConfig) -> str:
    """The URL that reaches the application from this machine (its route prefix included)."""
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    return f"http://{host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"


def check_served(cfg: Config, model: str | None) -> str:
    """The version the served reference names now: a missing alias or version fails here in a
    second, naming it, rather than after Ray started and Serve retried its replicas."""
    main, _ = served_refs(cfg, model)
    return resolve_version(open_registry(cfg.mlflow), main)


def start_serving(cfg: Config, model: str | None) -> Started:
    """Deploy the application on the connected Ray and wait until it answers /healthz."""
    from ray import serve

    from emotr.serve.app import application, server_settings

    main, challenger = served_refs(cfg, model)
    version = resolve_version(open_registry(cfg.mlflow), main)
    settings = server_settings(cfg, main, challenger)
    if not _serve_running():
        check_port_free(cfg.serve)
    serve.start(http_options=http_options(cfg.serve))
    serve.run(application(settings), name=cfg.serve.app_name, route_prefix=cfg.serve.route_prefix)
    url = local_url(cfg.serve)
    wait_until_ready(url, timeout_s=120.0)
    return Started(url, main, version, challenger, _metrics_url())


def _metrics_url() -> str | None:
    """Where this node's Ray exports metrics (Serve's and emotr's) for Prometheus."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == node_id and node.get("MetricsExportPort"):
            return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    return None


def _serve_running() -> bool:
    """Whether the connected Ray runs Serve already (its proxy holds the port it was given)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True


def check_port_free(cfg: ServeConfig) -> None:
    """Refuse a port something already listens on (ServeError): Serve's proxy binds with
    SO_REUSEPORT, so a second server on the same port would start without an error and the
    kernel would split the requests between the two."""
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    with socket.socket() as probe:
        probe.settimeout(1.0)
        if probe.connect_ex((host, cfg.port)) == 0:
            raise ServeError(
                f"serve.port {cfg.port}: something already listens on {host}:{cfg.port} (another "
                "emotr serve?); stop it, or choose another port (serve.port=8001)"
            )


def check_replica_fits(cfg: ServeConfig, nodes: list[dict[str, Any]]) -> None:
    """Refuse a replica that asks more CPUs or GPUs than any alive node of the Ray has
    (ServeError): on a private Ray no bigger node ever comes, and Serve would wait for one
    without a word. `nodes` as `ray.nodes()` gives them."""
    alive = [node.get("Resources", {}) for node in nodes if node.get("Alive")]
    asked = {"CPU": cfg.cpus_per_replica, "GPU": cfg.gpus_per_replica}
    for resource, key in (("CPU", "cpus_per_replica"), ("GPU", "gpus_per_replica")):
        most = max((float(found.get(resource, 0.0)) for found in alive), default=0.0)
        if asked[resource] > most:
            raise ServeError(
                f"serve.{key}={asked[resource]:g}: a replica would need {asked[resource]:g} "
                f"{resource}s and this Ray's largest node has {most:g}; ask at most that "
                f"(serve.{key}={most:g}), or serve on a cluster with bigger nodes (ray.address)"
            )


def stop_serving(cfg: ServeConfig) -> None:
    """Delete the application (its replicas stop; Serve's proxy stays for other applications)."""
    from ray import serve

    serve.delete(cfg.app_name)


def wait_until_ready(url: str, timeout_s: float) -> None:
    """Poll GET /healthz until it answers 200; a ServeError after timeout_s."""
    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        try:
            answer = requests.get(f"{url}/healthz", timeout=5)
            if answer.status_code == 200:
                return
            last = f"HTTP {answer.status_code}"
        except requests.RequestException as error:
            last = type(error).__name__
        time.sleep(0.5)
    raise ServeError(f"{url}/healthz did not answer 200 within {timeout_s:g} s ({last})")


def serve_config(cfg: Config, model: str | None) -> dict[str, Any]:
    """The Serve config file (`serve deploy FILE`) of this application: self-contained, the
    whole of what a replica reads is in the builder's args."""
    from emotr.serve.app import deployment_options, server_settings

    settings = server_settings(cfg, *served_refs(cfg, model))
    return {
        "proxy_location": "EveryNode",
        "http_options": http_options(cfg.serve),
        "applications": [
            {
                "name": cfg.serve.app_name,
                "route_prefix": cfg.serve.route_prefix,
                "import_path": IMPORT_PATH,
                "args": {"settings": settings.model_dump(mode="json")},
                "deployments": [{"name": DEPLOYMENT, **deployment_options(cfg.serve)}],
            }
        ],
    }


def write_build(cfg: Config, model: str | None, path: Path) -> str:
    """Write the Serve config to `path`; a KubeRay RayService manifest there keeps every other
    line and gets the config as its serveConfigV2. Returns what was written ("Serve config" or
    "RayService")."""
    config = yaml.dump(serve_config(cfg, model), sort_keys=False, width=100)
    if path.is_file():
        text = path.read_text()
        if (
            isinstance(manifest := yaml.safe_load(text), dict)
            and manifest.get("kind") == "RayService"
        ):
            path.write_text(_with_serve_config(text, config))
            return "RayService"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# `serve deploy` this file; written by `emotr serve --build`\n" + config)
    return "Serve config"


def _with_serve_config(manifest: str, config: str) -> str:
    """The manifest's text with its serveConfigV2 block replaced by `config` (a literal block),
    comments and layout of every other line kept."""
    lines = manifest.splitlines(keepends=True)
    key = next(
        (i for i, line in enumerate(lines) if line.lstrip().startswith("serveConfigV2:")), None
    )
    if key is None:
        raise ServeError("the RayService manifest has no spec.serveConfigV2 line to fill")
    indent = len(lines[key]) - len(lines[key].lstrip())
    end = key + 1
    while end < len(lines) and (
        not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent
    ):
        end += 1
    block = [" " * indent + "serveConfigV2: |\n"]
    block += [" " * (indent + 2) + line + "\n" for line in config.splitlines()]
    return "".join([*lines[:key], *block, *lines[end:]])
