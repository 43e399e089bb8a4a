"""The doctor's checks as the CLI runs them: `emotr doctor`, the checks before a job's work, Ray.

A job runs the local checks first, then starts Ray while the tracking checks run; a red check
ends it with its fix. Ray is imported inside the functions that start it: light commands (and
a job with nothing to do) never load it; the checks (pandas, pyarrow) inside the functions that
run them, so that `emotr --help` answers at once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from rich.text import Text

from emotr.cli.options import ConfigOption, Overrides, load_command_config
from emotr.cli.output import (
    console,
    errors,
    fail,
    hold_native_stderr,
    quiet_ray_data_console,
    settings,
)
from emotr.config import Config
from emotr.config_io import DEFAULT_CONFIG

if TYPE_CHECKING:
    from emotr.ops.doctor import Check


def doctor(config: ConfigOption = DEFAULT_CONFIG, overrides: Overrides = None) -> None:
    """Check, in seconds, everything a job needs; one line per check, exit 1 on any red.

    Weights, data, cache and artifact roots (written and deleted), tracking server and Optuna
    storage (reachable, schema), Ray (nodes, CPUs/GPUs, the Keras backend on every node) and,
    on a cluster, relative paths that a submitted job would resolve in a temporary folder.
    """
    from emotr.ops.doctor import check_all

    cfg = load_command_config(config, overrides)
    results = []
    for check in check_all(cfg, on_cluster(cfg), ray_where(cfg), lambda: init_ray(cfg)):
        mark, style = ("✓", "bold green") if check.ok else ("✗", "bold red")
        line = Text.assemble((f"{mark} {check.name:<9}", style), " ", check.text())
        console.print(line, soft_wrap=True)  # one line per check, whatever the width
        results.append(check)
    n_red = sum(not check.ok for check in results)
    if n_red:
        raise fail(f"{n_red} of {len(results)} checks failed")
    console.print(f"all {len(results)} checks passed")


def on_cluster(cfg: Config) -> bool:
    """Whether this run joins a Ray cluster: ray.address set, or started by `ray job submit`."""
    return bool(cfg.ray.address or os.environ.get("RAY_ADDRESS"))


def ray_where(cfg: Config) -> str:
    """Which Ray this run joins, as a check's subject names it."""
    if cfg.ray.address:
        return f"ray.address={cfg.ray.address}"
    if os.environ.get("RAY_ADDRESS"):
        return f"RAY_ADDRESS={os.environ['RAY_ADDRESS']} (the job's cluster)"
    return "a private local Ray (ray.address null)"


def init_ray(cfg: Config) -> None:
    """Start or join the Ray that `ray_where` names; its start-up and Ray Data's INFO lines
    and its core worker's native lines stay off the console (--debug shows them)."""
    import ray

    hold_native_stderr()
    # Ray's INFO lines: "Started a local Ray instance", "Generated new authentication token".
    level = logging.INFO if settings.debug else logging.WARNING
    quiet = {"log_to_driver": False, "logging_level": level}
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, **quiet)
    elif os.environ.get("RAY_ADDRESS"):
        # Under `ray job submit` the job's driver joins its own cluster, named by RAY_ADDRESS.
        ray.init(**quiet)
    else:
        # "local": a private Ray, never a stray cluster that Ray's temp folder still names.
        kwargs = {"num_cpus": cfg.ray.num_cpus} if cfg.ray.num_cpus else {}
        if cfg.ray.num_gpus is not None:
            kwargs["num_gpus"] = cfg.ray.num_gpus
        ray.init(address="local", include_dashboard=False, **quiet, **kwargs)
    quiet_ray_data_console()


def connect_ray(cfg: Config) -> None:
    """Connect once, then check the cluster (nodes, temp dirs, the backend on every node)."""
    import ray

    from emotr.ops.doctor import check_ray

    if ray.is_initialized():
        return
    backend = cfg.extract.keras_backend
    require_green([check_ray(ray_where(cfg), backend, lambda: init_ray(cfg), cfg.ray.address)])


def check_before_work(cfg: Config) -> None:
    """The doctor's local checks a job runs first (paths, weights, cache); red ones end it."""
    from emotr.ops.doctor import check_stores

    require_green(check_stores(cfg, on_cluster(cfg), tracking=False))


def connect_ray_checking_tracking(cfg: Config) -> None:
    """Start Ray while a thread checks the tracking store and Optuna storage; red ends the job.

    Both take seconds and wait on different things: Ray on the processes it starts, the
    check on MLflow's import and the store's answer. (Ray starts in this, the main thread: it
    sets signal handlers.)
    """
    from emotr.ops.doctor import check_tracking_stores

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="emotr-checks") as pool:
        checks = pool.submit(lambda: list(check_tracking_stores(cfg, on_cluster(cfg))))
        connect_ray(cfg)
        require_green(checks.result())


def require_green(checks: Iterable[Check]) -> None:
    """Print each red check with its fix and end the command (--debug: raise the first's error)."""
    red = [check for check in checks if not check.ok]
    for check in red:
        errors.print(Text.assemble(("✗ " + check.name, "bold red"), " ", check.text()))
    if red and settings.debug and red[0].error is not None:
        raise red[0].error
    if red:
        raise fail(f"{len(red)} check(s) failed; `emotr doctor -c FILE` runs them all")
