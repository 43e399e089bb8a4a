"""`emotr doctor`: check, in seconds and before any work, what a job needs; one Check per concern.

A Check is green or red, says what it found and, when red, how to fix it. The checks never raise:
an error is what a red Check reports. The job (`emotr run/extract/tune`) runs them first.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from emotr.config import Config
from emotr.redaction import redact
from emotr.storage import is_relative_path


@dataclass(frozen=True)
class Check:
    """The outcome of one check: green (ok) or red, with what was found and the fix."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    # The exception behind a red check, for --debug; never shown otherwise.
    error: BaseException | None = field(default=None, compare=False, repr=False)

    def text(self) -> str:
        """One line: what was found, then the fix when red (passwords masked)."""
        fix = f"; fix: {self.fix}" if not self.ok and self.fix else ""
        return redact(f"{self.detail}{fix}")


def checked(name: str, fix: str, probe: Callable[[], str]) -> Check:
    """Run a probe that returns what it found; its exception becomes a red Check with `fix`."""
    try:
        return Check(name, True, probe())
    except Exception as error:  # any failure is what the check reports, with its fix
        reason = str(error).strip() or type(error).__name__
        return Check(name, False, f"{type(error).__name__}: {reason}", fix, error)


def _local_paths(cfg: Config) -> dict[str, tuple[str, str]]:
    """Config keys whose value holds a local path: key -> (the value, the path in it)."""
    values = {
        "cache.root": cfg.cache.root,
        "mlflow.artifact_location": cfg.mlflow.artifact_location,
        "mlflow.tracking_uri": cfg.mlflow.tracking_uri,
        "tune.storage": cfg.tune.storage,
        "extract.compilation_cache_dir": cfg.extract.compilation_cache_dir,
        "data.manifest" if cfg.data.manifest else "data.root": cfg.data.manifest or cfg.data.root,
    }
    if cfg.backbone.weights not in {"imagenet", "hed-bsds500", "none"}:
        values["backbone.weights"] = cfg.backbone.weights
    paths = {}
    for key, value in values.items():
        path = value.removeprefix("sqlite:///")  # a SQLite URL names a file
        if path and "://" not in path and not path.startswith("mlflow-artifacts:"):
            paths[key] = (value, path)
    return paths


def relative_paths(cfg: Config) -> dict[str, str]:
    """The config values holding a path that depends on the working directory, by config key."""
    return {
        key: value for key, (value, path) in _local_paths(cfg).items() if is_relative_path(path)
    }


def check_paths(cfg: Config, on_cluster: bool) -> Check:
    """On a cluster, refuse relative paths: a submitted job resolves them in a temporary folder."""
    relative = relative_paths(cfg)
    if not relative:
        return Check("paths", True, "every path is absolute or a URI")
    named = ", ".join(f"{key}={value}" for key, value in relative.items())
    if not on_cluster:
        return Check("paths", True, f"relative to {_cwd_text()}: {named}")
    return Check(
        "paths",
        False,
        f"relative on a cluster: {named}; a job submitted with `ray job submit --working-dir` "
        "resolves them inside Ray's temporary copy of the working dir, deleted with the job",
        "give each an s3:// (gs://) URI or an absolute path that every node mounts",
    )


def _cwd_text() -> str:
    try:
        return os.getcwd()
    except FileNotFoundError:
        return "a working directory that no longer exists"
