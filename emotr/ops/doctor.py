"""`emotr doctor`: check, in seconds and before any work, what a job needs; one Check per concern.

A Check is green or red, says what it found and, when red, how to fix it. The checks never raise:
an error is what a red Check reports. The job (`emotr run/extract/tune`) runs them first: all but
`data` (its listing is that check) before Ray starts, and `ray` once it is connected.

emotr.ops.cluster (Ray) is imported inside the Ray check alone: light commands load this module.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from emotr.config import (
    BackboneConfig,
    CacheConfig,
    Config,
    DataConfig,
    MlflowConfig,
    TuneConfig,
    configured_paths,
)
from emotr.errors import EmotrError
from emotr.hardware import describe_precision
from emotr.ops import findings
from emotr.redaction import redact
from emotr.storage import is_relative_path

# Characters of an error's text that a red line shows.
MAX_REASON = 400


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


def checked(name: str, subject: str, fix: str, probe: Callable[[], str]) -> Check:
    """Run a probe that returns what it found about `subject` (e.g. `cache.root=...`).

    Its exception becomes a red Check with the fix: the reason is the exception's first line.
    """
    try:
        return Check(name, True, f"{subject}: {probe()}")
    except Exception as error:  # any failure is what the check reports, with its fix
        reason = (str(error).strip() or type(error).__name__).splitlines()[0]
        if len(reason) > MAX_REASON:  # the start says what failed; --debug shows the rest
            reason = reason[: MAX_REASON - 3] + "..."
        return Check(name, False, f"{subject}: {type(error).__name__}: {reason}", fix, error)


def check_all(
    cfg: Config, on_cluster: bool, ray_where: str, connect_ray: Callable[[], None]
) -> Iterator[Check]:
    """Every check, one at a time, in the order a job needs them: `emotr doctor`."""
    yield from check_stores(cfg, on_cluster, data=True)
    yield check_ray(ray_where, cfg.extract.keras_backend, connect_ray, cfg.ray.address)


def check_stores(
    cfg: Config, on_cluster: bool, data: bool = False, tracking: bool = True
) -> Iterator[Check]:
    """All but Ray, one Check at a time: paths, weights, (data,) cache, tracking, artifacts, study.

    A job leaves the data out: its listing, right after, is that check. tracking=False stops
    after the cache: `emotr extract` checks the rest only once it knows it has work.
    """
    paths = check_paths(cfg, on_cluster)
    yield paths
    yield check_weights(cfg.backbone)
    if data:
        yield check_data(cfg.data)
    # A relative store on a cluster is not probed: probing would create it where it is lost.
    lost = relative_paths(cfg) if not paths.ok else {}
    yield _unless_lost(lost, "cache", "cache.root", lambda: check_cache(cfg.cache))
    if tracking:
        yield from check_tracking_stores(cfg, on_cluster)


def check_tracking_stores(cfg: Config, on_cluster: bool) -> Iterator[Check]:
    """The MLflow tracking store, its artifact root and the Optuna storage."""
    lost = relative_paths(cfg) if on_cluster else {}
    key = "mlflow.tracking_uri"
    tracking = _unless_lost(lost, "tracking", key, lambda: check_tracking(cfg.mlflow))
    yield tracking
    key = "mlflow.artifact_location"
    if tracking.ok:
        yield _unless_lost(lost, "artifacts", key, lambda: check_artifacts(cfg.mlflow))
    else:  # the experiment's artifact root is the tracking store's to say
        yield Check(
            "artifacts", False, f"{key}={cfg.mlflow.artifact_location}: not probed", "see tracking"
        )
    yield _unless_lost(lost, "optuna", "tune.storage", lambda: check_optuna(cfg.tune))


def _unless_lost(lost: dict[str, str], name: str, key: str, check: Callable[[], Check]) -> Check:
    if key in lost:
        return Check(name, False, f"{key}={lost[key]}: not probed", "see paths")
    return check()


def _local_paths(cfg: Config) -> dict[str, tuple[str, str]]:
    """Config keys whose value holds a local path: key -> (the value, the path in it)."""
    values = configured_paths(cfg)
    if cfg.data.manifest:  # the manifest's paths are read, not data.root
        values.pop("data.root", None)
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


def check_weights(backbone: BackboneConfig) -> Check:
    """The backbone's weights can be had: the file's sha256, the package, or Keras' cache."""
    fix = "put the file there, or choose backbone.weights as the message says"
    return checked(
        "weights",
        f"backbone.weights={backbone.weights}",
        fix,
        lambda: (
            f"{findings.describe_weights(backbone)}; backbone.precision="
            f"{describe_precision(backbone.precision)}"
        ),
    )


def check_data(data: DataConfig) -> Check:
    """The data set is listable: its images per class, from file metadata alone (no bytes read)."""
    key = "data.manifest" if data.manifest else "data.root"
    folders = ", ".join(data.classes) if data.classes else "one per class"
    fix = (
        f"point {key} at images in <class>/ folders ({folders}) or a path,label "
        "table; for s3:// the AWS_* credentials must allow listing"
    )
    return checked(
        "data", f"{key}={data.manifest or data.root}", fix, lambda: findings.count_images(data)
    )


def check_cache(cache: CacheConfig) -> Check:
    """The feature cache can be written: a probe object is written and deleted."""
    fix = (
        "make cache.root writable by this user; for s3:// the bucket must exist and the AWS_* "
        "credentials must allow put and delete"
    )
    return checked(
        "cache", f"cache.root={cache.root}", fix, lambda: findings.probe_writable(cache.root)
    )


def check_tracking(mlflow: MlflowConfig) -> Check:
    """The tracking store answers: its MLflow version, its schema, the experiment."""
    fix = (
        "start the tracking server (or its database) or fix mlflow.tracking_uri; a server with "
        "authentication reads MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD"
    )
    subject = f"mlflow.tracking_uri={mlflow.tracking_uri}"
    return checked("tracking", subject, fix, lambda: findings.describe_tracking_store(mlflow))


def check_artifacts(mlflow: MlflowConfig) -> Check:
    """Runs can store artifacts: a probe is written and deleted where the experiment keeps them."""
    fix = (
        "make the artifact root writable (for mlflow-artifacts:/ the server's "
        "--artifacts-destination and its credentials), or fix mlflow.artifact_location"
    )
    subject = f"mlflow.artifact_location={mlflow.artifact_location}"
    return checked("artifacts", subject, fix, lambda: findings.probe_artifacts(mlflow))


def check_optuna(tune: TuneConfig) -> Check:
    """The study's database answers: its Optuna schema version and the study's trials."""
    fix = (
        "start the database or fix tune.storage; PostgreSQL reads the password from PGPASSWORD "
        "or ~/.pgpass (never write it into tune.storage)"
    )
    return checked(
        "optuna", f"tune.storage={tune.storage}", fix, lambda: findings.describe_study_storage(tune)
    )


def check_ray(
    where: str, keras_backend: str, connect: Callable[[], None], address: str | None = None
) -> Check:
    """Connect with `connect`, then the nodes, CPUs/GPUs and the Keras backend on every node.

    `where` says which Ray the run joins (the CLI knows: ray.address, RAY_ADDRESS or local);
    an explicit host:port `address` must accept a connection first (Ray retries for minutes).
    """

    def probe() -> str:
        if address:
            findings.require_listening(address)
        connect()
        from emotr.ops.cluster import describe_cluster

        return describe_cluster(keras_backend)

    fix = (
        "start the cluster or fix ray.address (auto: this machine's cluster; RAY_ADDRESS under "
        "`ray job submit`), with its token in RAY_AUTH_TOKEN"
    )
    check = checked("ray", where, fix, probe)
    if isinstance(check.error, EmotrError):  # its message names the node and its own fix
        return Check("ray", False, check.detail, "", check.error)
    return check
