"""emotr doctor's checks on local stores: green with what they found, red with the fix."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from emotr.config_io import load_config
from emotr.errors import EmotrError
from emotr.ops.doctor import check_paths
from emotr.storage import absolute_path
from tests.conftest import SMOKE, smoke_config


def test_relative_store_paths_are_refused_on_a_cluster_with_the_fix():
    cfg = load_config([SMOKE])  # the defaults: .emotr/... under the working directory
    check = check_paths(cfg, on_cluster=True)
    assert not check.ok
    text = check.text()
    for named in (
        "cache.root=.emotr/cache",
        "tune.storage=sqlite:///.emotr/optuna.db",
        "mlflow.tracking_uri=sqlite:///.emotr/mlflow.db",
        "mlflow.artifact_location=.emotr/mlartifacts",
        "data.root=.emotr/data/demo",
    ):
        assert named in text
    assert "ray job submit" in text and "fix: give each an s3://" in text


def test_relative_paths_are_fine_off_a_cluster_and_absolute_ones_everywhere(tmp_path: Path):
    assert check_paths(load_config([SMOKE]), on_cluster=False).ok
    absolute = smoke_config(tmp_path, "mlflow.artifact_location=mlflow-artifacts:/emotr")
    assert check_paths(absolute, on_cluster=True).ok
    remote = load_config(
        [SMOKE],
        [
            "data.root=s3://emotr/images",
            "cache.root=s3://emotr/cache",
            "tune.storage=postgresql://emotr@postgres:5432/optuna",
            "mlflow.tracking_uri=http://mlflow:5000",
            "mlflow.artifact_location=mlflow-artifacts:/emotr",
        ],
    )
    assert check_paths(remote, on_cluster=True).ok


@pytest.fixture
def vanished_cwd(tmp_path: Path):
    """The process's working directory deleted under it, as a job's was (Ray's working_dir)."""
    before = os.getcwd()
    gone = tmp_path / "working_dir"
    gone.mkdir()
    os.chdir(gone)
    gone.rmdir()
    yield
    os.chdir(before)


def test_a_relative_path_in_a_vanished_working_dir_names_the_key_and_the_cause(vanished_cwd):
    with pytest.raises(EmotrError) as error:
        absolute_path(".emotr/mlartifacts", "mlflow.artifact_location")
    message = str(error.value)
    assert "mlflow.artifact_location=.emotr/mlartifacts is a relative path" in message
    assert "own --temp-dir" in message
    assert absolute_path("/abs/mlartifacts", "mlflow.artifact_location") == Path("/abs/mlartifacts")


def test_errors_from_a_vanished_working_dir_say_why_it_vanished(vanished_cwd, tmp_path: Path):
    from emotr.cli.messages import describe_os_error
    from emotr.config import MlflowConfig
    from emotr.track import artifact_location

    with pytest.raises(EmotrError, match="own --temp-dir"):
        artifact_location(MlflowConfig(artifact_location=".emotr/mlartifacts"))
    # What MLflow's own os.getcwd() raised in the job: no path, so the CLI says what is gone.
    bare = FileNotFoundError(2, "No such file or directory")
    message = describe_os_error(bare, smoke_config(tmp_path))
    assert "the working directory" in message and "no longer exists" in message
    assert "own --temp-dir" in message


def test_nodes_of_one_host_sharing_a_temp_dir_are_named():
    from emotr.ops.cluster import shared_session_dirs

    def node(node_id: str, ip: str, socket: str) -> dict[str, str]:
        return {"NodeID": node_id, "NodeManagerAddress": ip, "RayletSocketName": socket}

    nodes = [
        node("head", "10.0.0.1", "/tmp/ray/session_1/sockets/raylet"),
        node("second", "10.0.0.1", "/tmp/ray/session_1/sockets/raylet.1"),  # no --temp-dir
        node("own", "10.0.0.1", "/tmp/ray-worker/session_1/sockets/raylet"),
        node("other-host", "10.0.0.2", "/tmp/ray/session_1/sockets/raylet"),
    ]
    assert shared_session_dirs(nodes) == {"10.0.0.1:/tmp/ray/session_1": ["head", "second"]}


def test_the_study_check_reports_the_schema_and_the_trials_of_the_study(tmp_path: Path):
    import optuna

    from emotr.ops.doctor import check_optuna

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    cfg = load_config([SMOKE], [f"tune.storage={url}", "tune.study_name=s"])
    assert "a new SQLite file" in check_optuna(cfg.tune).text()
    study = optuna.create_study(study_name="s", storage=url)
    study.tell(study.ask(), 0.5)
    check = check_optuna(cfg.tune)
    assert check.ok and "Optuna schema v" in check.text() and "study 's': 1 trials" in check.text()


def test_an_unwritable_cache_is_red_with_the_key_the_path_and_the_fix(tmp_path: Path):
    from emotr.ops.doctor import check_cache

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    check = check_cache(load_config([SMOKE], [f"cache.root={blocker}/cache"]).cache)
    assert not check.ok
    assert check.text().startswith(f"cache.root={blocker}/cache: ")
    assert "fix: make cache.root writable" in check.text()
    assert isinstance(check.error, OSError)
