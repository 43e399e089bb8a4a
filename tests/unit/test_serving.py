"""The deployable model (emotr.deploy.serving) rebuilt from its weight files: rows in, rows out."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from emotr.config import BackboneConfig, DecodeConfig
from emotr.data.imageio import decode_image
from emotr.deploy.serving import ImageScorer, ServingSpec
from emotr.extract.backbone import FeatureExtractor, save_conv_base_weights
from emotr.hardware import machine_bfloat16, run_precision
from emotr.hyperparams import HeadParams
from emotr.search.head import build_head, predict_proba

BACKBONE = BackboneConfig(weights="none", input_size=(32, 32), precision="float32")


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    """A scorer rebuilt from .weights.h5 files, and the head it was saved from."""
    folder = tmp_path_factory.mktemp("serving")
    save_conv_base_weights(BACKBONE, folder / "backbone.weights.h5")
    params = HeadParams(standardize=True, n_layers=1, units=8)
    rng = np.random.default_rng(0)
    head = build_head(params, 512, rng.normal(3.0, 2.0, (16, 512)).astype(np.float32))
    head.save_weights(str(folder / "head.weights.h5"))
    spec = ServingSpec(
        backbone=BACKBONE, decode=DecodeConfig(), head=params, n_features=512, classes=("no", "yes")
    )
    built = ImageScorer(spec, folder / "backbone.weights.h5", folder / "head.weights.h5")
    return built, head


def test_a_bfloat16_model_runs_in_what_this_machine_computes_natively(tmp_path):
    files = tmp_path / "backbone.weights.h5", tmp_path / "head.weights.h5"
    save_conv_base_weights(BACKBONE, files[0])
    params = HeadParams(n_layers=0)
    build_head(params, 512).save_weights(str(files[1]))
    trained = BACKBONE.model_copy(update={"precision": "bfloat16"})
    spec = ServingSpec(
        backbone=trained, decode=DecodeConfig(), head=params, n_features=512, classes=("a", "b")
    )
    built = ImageScorer(spec, *files)
    here = "bfloat16" if machine_bfloat16() else "float32"
    assert built.precision == here and built.extractor.cfg.precision == here
    assert run_precision("bfloat16", None) == "float32"  # no native bfloat16: float32
    assert run_precision("bfloat16", "CPU with AVX-512 BF16") == "bfloat16"
    assert run_precision("float32", "CPU with AMX-BF16") == "float32"  # as trained


def _jpeg(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_rebuilt_model_scores_as_the_saved_head(scorer):
    built, head = scorer
    data = _jpeg((200, 40, 10))
    pixels = decode_image(data, (32, 32), max_pixels=DecodeConfig().max_pixels)[None]
    # Same weights, same normalization statistics: the served probability is the head's.
    features = FeatureExtractor(BACKBONE)(pixels)
    expected = predict_proba(head, features)[0, 1]
    rows = built.score(pd.DataFrame({"image": [data]}))
    assert rows["p_yes"][0] == pytest.approx(expected, abs=1e-5)
    assert rows["label"][0] == ("yes" if expected >= 0.5 else "no")
    assert rows["error"][0] is None
    # Features given for a row (the feature cache's) are used as they are, not decoded again.
    from_cache = built.score(pd.DataFrame({"image": [b"unused"]}), known={0: features[0]})
    assert from_cache["p_yes"][0] == pytest.approx(expected, abs=1e-6)


def test_every_row_gets_an_answer_and_bad_rows_a_reason(scorer, tmp_path: Path):
    built, _ = scorer
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(_jpeg((10, 200, 30)))
    frame = pd.DataFrame(
        {
            "image": [
                _jpeg((1, 2, 3)),
                base64.b64encode(_jpeg((9, 9, 9))).decode(),  # base64 text, as over REST
                None,
                b"\xff\xd8\xff cut short",
                None,
                None,
            ],
            "path": [None, None, str(photo), None, str(tmp_path / "missing.jpg"), None],
        }
    )
    rows = built.score(frame)
    assert len(rows) == 6
    assert rows["error"][:3].isna().all()
    assert all(0.0 <= p <= 1.0 for p in rows["p_yes"][:3])
    assert rows["p_yes"][3:].isna().all() and rows["label"][3:].isna().all()
    assert rows["error"][3].startswith(("not an image", "truncated", "corrupt"))
    assert rows["error"][4].startswith("cannot read file")
    assert "give the image bytes or a path" in rows["error"][5]
