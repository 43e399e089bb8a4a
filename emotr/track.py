"""Everything that talks to MLflow tracking: experiments, (nested) runs, params, metrics, artifacts.

Runs are addressed by id through one MlflowClient, so that a driver can keep several runs open at
once (one per in-flight trial) without MLflow's fluent active-run stack. Every text the tracker
records (params, tags, text and table artifacts) passes through `redact` first: a password written
into a URI of the config never reaches the tracking server.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import logging
import os
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from emotr.config import MlflowConfig
from emotr.redaction import redact
from emotr.storage import absolute_path, is_uri

_MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


def tracking_uri(cfg: MlflowConfig) -> str:
    """The tracking URI with a local SQLite file made absolute (workers may run elsewhere)."""
    uri = cfg.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = absolute_path(uri.removeprefix("sqlite:///"), "mlflow.tracking_uri")
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    return uri


def artifact_location(cfg: MlflowConfig) -> str:
    """The artifact root for new experiments as a URI."""
    # mlflow-artifacts:/path (served by `mlflow server --artifacts-destination`) has no "//".
    location = cfg.artifact_location
    if is_uri(location) or location.startswith(("file://", "mlflow-artifacts:")):
        return location
    return absolute_path(location, "mlflow.artifact_location").as_uri()


class Tracker:
    """One experiment in one tracking store; create it in the driver only (no migration races)."""

    def __init__(self, cfg: MlflowConfig):
        self.uri = tracking_uri(cfg)
        self.client = MlflowClient(tracking_uri=self.uri)
        experiment = self.client.get_experiment_by_name(cfg.experiment)
        if experiment is None:
            self.experiment_id = self.client.create_experiment(
                cfg.experiment, artifact_location=artifact_location(cfg)
            )
        else:
            self.experiment_id = experiment.experiment_id

    def start_run(
        self, name: str, parent_run_id: str | None = None, tags: Mapping[str, str] | None = None
    ) -> str:
        """Create a RUNNING run (nested under parent_run_id when given) and return its id."""
        all_tags = {MLFLOW_RUN_NAME: name, **{k: redact(str(v)) for k, v in (tags or {}).items()}}
        if parent_run_id:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        run = self.client.create_run(self.experiment_id, tags=all_tags, run_name=name)
        return run.info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED", error: str | None = None) -> None:
        """Close a run as FINISHED, FAILED or KILLED; an error text is kept as the `error` tag."""
        if error:
            self.client.set_tag(run_id, "error", redact(error)[:5000])
        self.client.set_terminated(run_id, status=status)

    @contextmanager
    def run(
        self, name: str, parent_run_id: str | None = None, tags: Mapping[str, str] | None = None
    ) -> Iterator[str]:
        """A run that ends FINISHED, FAILED (with the error) or KILLED (Ctrl-C), never RUNNING."""
        run_id = self.start_run(name, parent_run_id, tags)
        try:
            yield run_id
        except KeyboardInterrupt:
            self.end_run(run_id, "KILLED", "interrupted")
            raise
        except BaseException as error:
            self.end_run(run_id, "FAILED", f"{type(error).__name__}: {error}")
            raise
        else:
            self.end_run(run_id)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Log params in one request; values are stringified and cut to MLflow's limit."""
        batch = [Param(key, _param_value(value)) for key, value in params.items()]
        for start in range(0, len(batch), 100):  # MLflow accepts at most 100 params a request
            self.client.log_batch(run_id, params=batch[start : start + 100], synchronous=True)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        """Log several metrics at one step in one request."""
        stamp = int(time.time() * 1000)
        batch = [Metric(key, float(value), stamp, step) for key, value in metrics.items()]
        self._log_metric_batch(run_id, batch)

    def log_history(
        self, run_id: str, history: Mapping[str, list[float]], first_step: int = 1
    ) -> None:
        """Log per-epoch curves with step = epoch number, batched (one HTTP call costs ~60 ms)."""
        stamp = int(time.time() * 1000)
        batch = [
            Metric(key, float(value), stamp, first_step + index)
            for key, values in history.items()
            for index, value in enumerate(values)
        ]
        self._log_metric_batch(run_id, batch)

    def _log_metric_batch(self, run_id: str, batch: list[Metric]) -> None:
        for start in range(0, len(batch), 1000):  # MLflow accepts at most 1000 metrics a request
            self.client.log_batch(run_id, metrics=batch[start : start + 1000], synchronous=True)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        """Set string tags on a run."""
        for key, value in tags.items():
            self.client.set_tag(run_id, key, redact(str(value)))

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """Store text (YAML, CSV, JSON) as an artifact file."""
        self.client.log_text(run_id, redact(text), artifact_file)

    def log_table(self, run_id: str, table: Any, artifact_file: str) -> None:
        """Store a pandas DataFrame as a CSV artifact."""
        self.client.log_text(run_id, redact(table.to_csv(index=False)), artifact_file)

    def log_dataset(
        self,
        run_id: str,
        *,
        name: str,
        digest: str,
        source: str,
        profile: Mapping[str, Any],
        context: str = "training",
    ) -> None:
        """Record a run's input data set (the runs table's Dataset column); no data is uploaded.

        MLflow stores at most 36 characters of a digest: a sha256 is cut to its first 32.
        """
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        dataset = Dataset(
            name=name,
            digest=digest[:32],
            source_type="local" if not is_uri(source) else source.split("://")[0],
            source=json.dumps({"uri": redact(source)}),
            profile=json.dumps(dict(profile)),
        )
        tags = [InputTag(MLFLOW_DATASET_CONTEXT, context)]
        self.client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags)])

    def log_figure(self, run_id: str, figure: Any, artifact_file: str) -> None:
        """Store a matplotlib figure as PNG and close it."""
        import matplotlib.pyplot as plt

        self.client.log_figure(run_id, figure, artifact_file)
        plt.close(figure)

    def log_bytes(self, run_id: str, data: bytes, artifact_file: str) -> None:
        """Store raw bytes as an artifact file."""
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / Path(artifact_file).name
            path.write_bytes(data)
            parent = str(Path(artifact_file).parent)
            self.client.log_artifact(run_id, str(path), None if parent == "." else parent)

    def find_runs(self, filter_string: str, max_results: int = 1000) -> list[Any]:
        """Runs of this experiment matching an MLflow search filter."""
        return self.client.search_runs(
            [self.experiment_id], filter_string=filter_string, max_results=max_results
        )

    def find_all_runs(self, filter_string: str) -> list[Any]:
        """Every run of this experiment matching a filter, following MLflow's pages."""
        runs: list[Any] = []
        token = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id],
                filter_string=filter_string,
                max_results=1000,
                page_token=token,
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def reopen_run(self, run_id: str) -> None:
        """Mark a finished run RUNNING again (a resumed study keeps logging into its parent run)."""
        self.client.update_run(run_id, status="RUNNING")

    def log_dir_bytes(self, run_id: str, data: bytes, artifact_path: str) -> None:
        """Upload a folder packed by `pack_dir` (e.g. by a worker) under artifact_path."""
        with tempfile.TemporaryDirectory() as folder:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r") as archive:
                archive.extractall(folder, filter="data")
            self.client.log_artifacts(run_id, folder, artifact_path)


def pack_dir(local_dir: str | Path) -> bytes:
    """A folder's files as uncompressed tar bytes (.keras files are already zip-compressed)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for path in sorted(Path(local_dir).rglob("*")):
            archive.add(path, arcname=str(path.relative_to(local_dir)), recursive=False)
    return buffer.getvalue()


def keras_model_bytes(model: Any, x_example: Any) -> bytes:
    """An MLflow Keras model (with signature) packed by `pack_dir`; runs in workers, no tracking.

    The driver uploads it with `Tracker.log_dir_bytes(run_id, data, "model")`, so that
    `runs:/<run_id>/model` loads with mlflow.pyfunc and registers like a model from log_model.
    """
    # mlflow.keras imports Keras: only the workers that pack a model load it.
    import mlflow.keras
    from mlflow.models import infer_signature

    output = model(x_example, training=False)
    signature = infer_signature(x_example, output.numpy() if hasattr(output, "numpy") else output)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model"
        mlflow.keras.save_model(
            model, str(path), signature=signature, pip_requirements=pinned_requirements()
        )
        return pack_dir(path)


def pinned_requirements() -> list[str]:
    """keras==..., tensorflow==...: what a logged Keras model needs, pinned as installed."""
    # Explicit requirements: inferring them starts a subprocess that loads the model (seconds).
    tf = pinned(("tensorflow",)) or pinned(("tensorflow-cpu",))
    return pinned(("keras",)) + tf


def pinned(names: tuple[str, ...]) -> list[str]:
    """name==version for each of the packages that is installed."""
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return pins


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | dict | tuple) else str(value)
    return redact(text)[:_MAX_PARAM_LENGTH]


@contextmanager
def quick_http(timeout_s: int = 5) -> Iterator[None]:
    """MLflow HTTP calls with one retry and a short timeout, for checks that answer in seconds.

    MLflow's defaults (7 retries, exponential backoff) take minutes against a server that is down.
    """
    # MLflow reads these on every request; there is no per-client setting.
    settings = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s),
    }
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    # The check reports the failure; urllib3's "Retrying ..." warnings would only repeat it.
    retries = logging.getLogger("urllib3.connectionpool")
    level = retries.level
    retries.setLevel(logging.ERROR)
    try:
        yield
    finally:
        retries.setLevel(level)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def describe_tracking(cfg: MlflowConfig) -> str:
    """What the tracking store says: the server's MLflow version and the experiment, if any."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    uri = tracking_uri(cfg)
    with quick_http():
        experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name(cfg.experiment)
        if uri.startswith(("http://", "https://")):
            response = http_request(get_default_host_creds(uri), "/version", "GET")
            found = f"MLflow {response.text.strip()} server"
        else:
            found = f"MLflow {mlflow.__version__} store"
    if experiment is None:
        return f"{found}; experiment {cfg.experiment!r} is created on the first run"
    return f"{found}; experiment {cfg.experiment!r} (id {experiment.experiment_id})"


def probe_artifact_root(cfg: MlflowConfig) -> str:
    """Write and delete a probe file where the experiment's runs store artifacts; returns where.

    An existing experiment keeps the location it was created with, whatever the config says now.
    """
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    uri = tracking_uri(cfg)
    with quick_http():
        experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name(cfg.experiment)
        location = experiment.artifact_location if experiment else artifact_location(cfg)
        repository = get_artifact_repository(location, tracking_uri=uri)
        probe = f".emotr-probe-{os.getpid()}-{time.time_ns()}"
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "probe.txt").write_text("probe")
            repository.log_artifact(str(Path(folder) / "probe.txt"), probe)
        repository.delete_artifacts(probe)
    return location


def ui_command(cfg: MlflowConfig) -> str:
    """The shell command that opens the MLflow UI on this tracking store."""
    uri = cfg.tracking_uri
    if uri.startswith("http"):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


__all__ = [
    "MLFLOW_PARENT_RUN_ID",
    "Tracker",
    "keras_model_bytes",
    "mlflow",
    "pack_dir",
    "tracking_uri",
    "ui_command",
]
