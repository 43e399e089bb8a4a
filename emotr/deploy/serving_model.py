"""The file MLflow logs as the deployable model's code (models-from-code, no pickle).

`mlflow.pyfunc.load_model` and `mlflow models serve` run this file, which rebuilds the classifier
from the version's artifacts with emotr's own code (emotr.deploy.serving). Like track.py and
registry.py it imports MLflow: it is the MLflow side of the deployable model.
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import pandas as pd
from mlflow.models import set_model

from emotr.deploy.serving import (
    BACKBONE_WEIGHTS_ARTIFACT,
    HEAD_WEIGHTS_ARTIFACT,
    SPEC_ARTIFACT,
    ImageScorer,
    ServingSpec,
    member_weights_artifact,
)


class EmotrImageModel(mlflow.pyfunc.PythonModel):
    """pyfunc: DataFrame with `image` (bytes) or `path` -> p_<class>..., label, error."""

    scorer: ImageScorer

    def load_context(self, context) -> None:
        """Rebuild the backbone and head(s) from the native Keras weight files."""
        artifacts = context.artifacts
        spec = ServingSpec.model_validate_json(Path(artifacts[SPEC_ARTIFACT]).read_text())
        if spec.members:  # an ensemble: one weights file per member head
            heads = [artifacts[member_weights_artifact(i)] for i in range(len(spec.members))]
        else:
            heads = artifacts[HEAD_WEIGHTS_ARTIFACT]
        self.scorer = ImageScorer(spec, artifacts[BACKBONE_WEIGHTS_ARTIFACT], heads)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """One row per image; a bad image is a row with its reason in `error`."""
        return self.scorer.score(pd.DataFrame(model_input))


set_model(EmotrImageModel())
