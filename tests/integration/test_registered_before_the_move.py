"""Versions registered before emotr's subpackages keep loading and scoring.

Such a version's code file is the flat layout's serving_model.py: it imports `emotr.serving`
(now a re-export of emotr.deploy.serving) and names its artifacts itself. The test logs a small
version with that file, as the old registry did, then loads it through the registry.
"""

from __future__ import annotations

import io
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from emotr.deploy.registry import load_model, scorer_of
from emotr.deploy.serving import ImageScorer, ServingSpec
from emotr.extract.backbone import save_conv_base_weights
from emotr.hyperparams import HeadParams
from emotr.search.head import build_head
from emotr.track import Tracker
from tests.conftest import smoke_config

pytestmark = pytest.mark.slow

# emotr/serving_model.py as the flat layout (emotr 0.1.0, before the subpackages) logged it.
FLAT_LAYOUT_SERVING_MODEL = """
from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import pandas as pd
from mlflow.models import set_model

from emotr.serving import ImageScorer, ServingSpec

SPEC = "spec"
BACKBONE_WEIGHTS = "backbone_weights"
HEAD_WEIGHTS = "head_weights"


class EmotrImageModel(mlflow.pyfunc.PythonModel):
    scorer: ImageScorer

    def load_context(self, context) -> None:
        spec = ServingSpec.model_validate_json(Path(context.artifacts[SPEC]).read_text())
        self.scorer = ImageScorer(
            spec, context.artifacts[BACKBONE_WEIGHTS], context.artifacts[HEAD_WEIGHTS]
        )

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return self.scorer.score(pd.DataFrame(model_input))


set_model(EmotrImageModel())
"""


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _artifacts(cfg, folder: Path) -> tuple[ServingSpec, dict[str, str]]:
    """spec.json and the two weight files of a version, written as the old registry wrote them."""
    head = HeadParams(n_layers=1, units=8)
    spec = ServingSpec(
        backbone=cfg.backbone,
        decode=cfg.decode,
        head=head,
        n_features=512,
        classes=("negative", "positive"),
    )
    paths = {
        "spec": folder / "spec.json",
        "backbone_weights": folder / "backbone.weights.h5",
        "head_weights": folder / "head.weights.h5",
    }
    paths["spec"].write_text(spec.model_dump_json(indent=2))
    save_conv_base_weights(cfg.backbone, paths["backbone_weights"])
    x = np.random.default_rng(0).normal(size=(4, 512)).astype(np.float32)
    build_head(head, 512, x).save_weights(str(paths["head_weights"]))
    return spec, {name: str(path) for name, path in paths.items()}


def test_a_version_logged_with_the_flat_layouts_code_file_loads_and_scores(tmp_path, mlflow_server):
    cfg = smoke_config(tmp_path, f"mlflow.tracking_uri={mlflow_server}", "mlflow.experiment=old")
    tracker = Tracker(cfg.mlflow)
    code_file = tmp_path / "serving_model.py"
    code_file.write_text(FLAT_LAYOUT_SERVING_MODEL)
    spec, artifacts = _artifacts(cfg, tmp_path)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracker.uri)
    try:
        with mlflow.start_run(experiment_id=tracker.experiment_id):
            info = mlflow.pyfunc.log_model(
                name="deployable", python_model=str(code_file), artifacts=artifacts
            )
        version = mlflow.register_model(info.model_uri, "emotr-flat-layout")
    finally:
        mlflow.set_tracking_uri(previous)

    model = load_model(tracker, f"models:/emotr-flat-layout/{version.version}")
    images = [_jpeg(seed) for seed in range(3)]
    rows = model.predict(pd.DataFrame({"image": images}))

    # The same weights scored by today's code give the same probabilities.
    expected = ImageScorer(spec, artifacts["backbone_weights"], artifacts["head_weights"])
    wanted = expected.score(pd.DataFrame({"image": images}))
    assert rows["error"].isna().all()
    assert np.allclose(rows["p_positive"].astype(float), wanted["p_positive"].astype(float))
    assert set(rows["label"]) <= {"negative", "positive"}
    assert scorer_of(model) is not None
