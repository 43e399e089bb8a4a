"""`emotr serve`: the registered model online on Ray Serve, or written down for `serve deploy`."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Annotated

import typer

from emotr.cli.doctor import connect_ray
from emotr.cli.options import ConfigOption, ModelOption, Overrides, load_command_config
from emotr.cli.output import console, fail, guard, quiet_serve_console
from emotr.config_io import DEFAULT_CONFIG


def serve(
    config: ConfigOption = DEFAULT_CONFIG,
    overrides: Overrides = None,
    model: ModelOption = None,
    build: Annotated[
        Path | None,
        typer.Option(
            help="Write the Serve config for `serve deploy` to this file instead of serving; a "
            "KubeRay RayService manifest there gets it as its serveConfigV2."
        ),
    ] = None,
    detach: Annotated[
        bool,
        typer.Option(help="Return once the application answers (needs ray.address: a cluster)."),
    ] = False,
) -> None:
    """Serve a registered version (default: the champion, followed when it moves) over HTTP."""
    cfg = load_command_config(config, overrides)
    from emotr.serve import launch

    with guard(cfg):
        if build is not None:
            kind = launch.write_build(cfg, model, build)
            console.print(f"wrote the {kind} of application {cfg.serve.app_name!r} to {build}")
            return
        if detach and cfg.ray.address is None:
            raise fail("--detach needs a cluster (ray.address): a private Ray ends with emotr", 2)
        launch.check_served(cfg, model)  # before Ray starts: a wrong --model fails at once
        private = cfg.ray.address is None and not os.environ.get("RAY_ADDRESS")
        if private:
            launch.check_port_free(cfg.serve)
        connect_ray(cfg)
        if private:  # a cluster's autoscaler may still add the node a replica needs
            import ray

            launch.check_replica_fits(cfg.serve, ray.nodes())
        quiet_serve_console()
        started = launch.start_serving(cfg, model)
    follows = " (followed when the alias moves)" if started.served.follows else ""
    console.print(
        f"serving {started.served.uri}: version {started.version}{follows} at {started.url}",
        highlight=False,
        soft_wrap=True,
    )
    if started.challenger is not None:
        console.print(f"?model=challenger answers with {started.challenger.uri}", highlight=False)
    console.print(
        f"open {started.url}/ in a browser, or: curl -F file=@photo.jpg {started.url}/predict "
        "(also /explain, /invocations, /healthz, /version)",
        highlight=False,
        soft_wrap=True,
    )
    if started.metrics:
        console.print(f"metrics for Prometheus: {started.metrics}", highlight=False)
    if detach:
        console.print(
            f"stop it with: serve shutdown, or emotr's app only: serve delete {cfg.serve.app_name}"
        )
        return
    # A process manager's SIGTERM stops it as Ctrl-C does (a shell's background job ignores
    # SIGINT, and Ray's own SIGTERM handler would exit without deleting the application).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:  # from the moment it says so, Ctrl-C stops the application cleanly
        console.print("Ctrl-C (or SIGTERM) stops it", style="dim")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        launch.stop_serving(cfg.serve)
        console.print("stopped")
