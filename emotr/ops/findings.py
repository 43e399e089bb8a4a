"""What each `emotr doctor` check looks at: a function returns what it found or raises why not.

They touch the stores (a probe object written and deleted, a database connection, a listing);
emotr.ops.doctor turns their outcome into green and red lines. MLflow (through emotr.track) and
SQLAlchemy are imported inside the functions that need them: `emotr --help` and every job's
first checks load this module, and only the tracking and database checks need those libraries.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from emotr.config import BackboneConfig, DataConfig, MlflowConfig, TuneConfig
from emotr.data.listing import list_files, resolve_classes
from emotr.extract.weights import weights_identity
from emotr.storage import check_writable, is_uri

if TYPE_CHECKING:
    import sqlalchemy

# Seconds a database server may take to accept a connection before its check turns red.
CONNECT_TIMEOUT_S = 5


def describe_weights(backbone: BackboneConfig) -> str:
    """The weights' identity: a file's sha256, Keras' cache, or random weights."""
    kind, _, value = weights_identity(backbone).partition(":")
    if kind == "none":
        return "random weights (features are meaningless: plumbing tests only)"
    if kind == "imagenet":
        # Where keras.utils.get_file caches downloads (importing Keras to ask costs seconds).
        home = Path(os.environ.get("KERAS_HOME", "~/.keras")).expanduser()
        if (home / "models" / value).is_file():
            return f"in Keras' cache here ({home / 'models' / value})"
        return "not in Keras' cache here: every extractor node downloads it on first use"
    return f"sha256 {value}"


def count_images(data: DataConfig) -> str:
    """Images per class, from file metadata alone (no byte read)."""
    if _demo_pending(data):
        return f"the demo data set ({data.demo_n} images) is generated there first"
    data = resolve_classes(data)  # data.classes null: the root's folders
    counts = list_files(data).files["class_name"].value_counts()
    missing = [name for name in data.classes if not counts.get(name)]
    if missing:
        raise ValueError(f"no images of class {', '.join(missing)}")
    per_class = ", ".join(f"{counts[name]} {name}" for name in data.classes)
    return f"{int(counts.sum())} images ({per_class})"


def _demo_pending(data: DataConfig) -> bool:
    """True when the job will generate the demo set into a new or empty local data.root."""
    if not data.generate_demo or data.manifest or is_uri(data.root):
        return False
    root = Path(data.root)
    return not root.exists() or (root.is_dir() and not any(root.iterdir()))


def probe_writable(location: str) -> str:
    """Write and delete a probe object in `location` (created when missing)."""
    check_writable(location)
    return "writable (a probe object written and deleted)"


def describe_tracking_store(mlflow: MlflowConfig) -> str:
    """The tracking store's MLflow version, the experiment, and a database's schema revision."""
    from emotr.track import describe_tracking, tracking_uri

    found = describe_tracking(mlflow)
    uri = tracking_uri(mlflow)
    if uri.startswith(("http://", "https://")):
        return found
    return f"{found}; schema {_schema_version(uri) or 'new'}"


def probe_artifacts(mlflow: MlflowConfig) -> str:
    """Write and delete a probe file where the experiment's runs keep their artifacts."""
    from emotr.track import artifact_location, probe_artifact_root

    location = probe_artifact_root(mlflow)
    if location != artifact_location(mlflow):
        return f"the experiment's own root {location} is writable (this key applies to new ones)"
    return "writable (a probe file written and deleted)"


def describe_study_storage(tune: TuneConfig) -> str:
    """The Optuna database's schema revision and the study's number of trials."""
    import sqlalchemy

    if tune.storage.startswith("sqlite:///"):
        path = Path(tune.storage.removeprefix("sqlite:///")).expanduser()
        if not path.exists():
            probe_writable(str(path.parent))
            return "a new SQLite file (its folder is writable)"
    version = _schema_version(tune.storage)
    if version is None:
        return "reachable, no tables yet (Optuna creates them on first use)"
    query = sqlalchemy.text(
        "SELECT count(*) FROM trials JOIN studies ON trials.study_id = studies.study_id "
        "WHERE studies.study_name = :name"
    )
    with _engine(tune.storage).connect() as connection:
        n_trials = connection.execute(query, {"name": tune.study_name}).scalar()
    return f"Optuna schema {version}; study {tune.study_name!r}: {n_trials} trials"


def _engine(url: str) -> sqlalchemy.Engine:
    import sqlalchemy

    # Without a timeout a firewalled database host hangs for the OS's TCP timeout (minutes).
    connect_args = {"connect_timeout": CONNECT_TIMEOUT_S} if url.startswith("postgresql") else {}
    return sqlalchemy.create_engine(url, connect_args=connect_args, poolclass=sqlalchemy.NullPool)


def _schema_version(url: str) -> str | None:
    """The alembic revision of a database (MLflow and Optuna both migrate with alembic)."""
    import sqlalchemy

    with _engine(url).connect() as connection:
        if not sqlalchemy.inspect(connection).has_table("alembic_version"):
            return None
        return connection.execute(
            sqlalchemy.text("SELECT version_num FROM alembic_version")
        ).scalar()


def require_listening(address: str) -> None:
    """Raise ConnectionError unless host:port accepts a TCP connection within seconds."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" and the like: Ray finds the address itself
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise ConnectionError(f"nothing answers on {host}:{port} ({error})") from None
