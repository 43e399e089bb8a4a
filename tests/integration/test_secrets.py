"""A password written into a config URI reaches no artifact, param, tag or console line."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from emotr.config_io import to_flat_dict, to_yaml
from emotr.track import Tracker
from tests.conftest import smoke_config

pytestmark = pytest.mark.slow

PASSWORD = "Sup3r-s3cret"
DSN = f"postgresql://optuna:{PASSWORD}@db.example:5432/optuna"


def test_the_tracker_records_the_config_without_the_password(tmp_path: Path, mlflow_server):
    cfg = smoke_config(
        tmp_path,
        f"tune.storage={DSN}",
        f"mlflow.tracking_uri={mlflow_server}",
        "mlflow.experiment=secrets",
    )
    tracker = Tracker(cfg.mlflow)
    with pytest.raises(RuntimeError), tracker.run("pipeline", tags={"storage": DSN}) as run_id:
        tracker.log_text(run_id, to_yaml(cfg), "config.yaml")
        tracker.log_params(run_id, to_flat_dict(cfg))
        tracker.set_tags(run_id, {"study_storage": DSN})
        raise RuntimeError(f"could not open {DSN}")

    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    config_yaml = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path))).read_text()
    recorded = [config_yaml, *run.data.params.values(), *run.data.tags.values()]
    assert not [text for text in recorded if PASSWORD in text]
    assert "storage: postgresql://optuna:***@db.example:5432/optuna" in config_yaml
    assert run.data.params["tune.storage"] == "postgresql://optuna:***@db.example:5432/optuna"
    assert run.data.tags["error"] == "RuntimeError: could not open " + DSN.replace(PASSWORD, "***")
