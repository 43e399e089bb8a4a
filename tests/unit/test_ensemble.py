"""An ensemble deployable model (ServingSpec.members): heads on different taps averaged behind
one VGG pass, rebuilt from its weight files like a single head."""

from __future__ import annotations

import io

import keras
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydantic import ValidationError

from emotr.config import BackboneConfig, DecodeConfig
from emotr.data.imageio import decode_image
from emotr.deploy.serving import HeadSpec, ImageScorer, ServingSpec
from emotr.extract.backbone import FeatureExtractor, save_conv_base_weights
from emotr.hyperparams import HeadParams
from emotr.insight.cam import CamError, map_grid
from emotr.search.head import build_head
from emotr.taps import combine_features

BACKBONE = BackboneConfig(weights="none", input_size=(32, 32), precision="float32")
CLASSES = ("no", "yes")
# Two trials' heads: the cache's gap5 and a combination whose gap4 only the second reads.
GAP5 = HeadParams(standardize=True, n_layers=1, units=8, features="gap5")
GAP45 = HeadParams(standardize=True, n_layers=0, features="gap4+gap5")


def _spec(head: HeadParams, n_features: int, members: tuple[HeadSpec, ...] = ()) -> ServingSpec:
    return ServingSpec(
        backbone=BACKBONE,
        decode=DecodeConfig(),
        head=head,
        n_features=n_features,
        classes=CLASSES,
        members=members,
    )


def _jpeg(color: tuple[int, int, int], seed: int) -> bytes:
    noise = np.random.default_rng(seed).normal(0, 40, (30, 40, 3))
    pixels = np.clip(np.array(color) + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


# Tinted noisy photos: random VGG weights still tell them apart.
IMAGES = [_jpeg((40 * k % 256, 90 + 20 * k, 220 - 25 * k), k) for k in range(8)]


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    """The ensemble of the two heads and each head's own single-head scorer, from files."""
    folder = tmp_path_factory.mktemp("ensemble")
    backbone = folder / "backbone.weights.h5"
    save_conv_base_weights(BACKBONE, backbone)
    # Standardised on the features of images like the test's: heads that answer neither 0 nor 1.
    keras.utils.set_random_seed(0)
    limit = DecodeConfig().max_pixels
    pixels = np.stack([decode_image(data, (32, 32), max_pixels=limit) for data in IMAGES])
    taps = FeatureExtractor(BACKBONE, outputs=("gap4", "gap5")).extract_outputs(pixels)
    files = []
    for index, (params, width) in enumerate(((GAP5, 512), (GAP45, 1024))):
        head = build_head(params, width, combine_features(params.features, taps))
        files.append(folder / f"head_{index}.weights.h5")
        head.save_weights(str(files[-1]))
    members = (HeadSpec(head=GAP5, n_features=512), HeadSpec(head=GAP45, n_features=1024))
    ensemble = ImageScorer(_spec(GAP5, 512, members), backbone, files)
    singles = [
        ImageScorer(_spec(member.head, member.n_features), backbone, path)
        for member, path in zip(members, files, strict=True)
    ]
    return ensemble, singles


def test_ensemble_answers_the_mean_of_its_heads(scorers):
    ensemble, singles = scorers
    images = [IMAGES[1], IMAGES[6], b"\xff\xd8\xff cut short"]
    frame = pd.DataFrame({"image": images})

    rows = ensemble.score(frame)
    each = [single.score(frame) for single in singles]

    expected = np.mean([s[["p_no", "p_yes"]][:2].to_numpy(dtype=float) for s in each], axis=0)
    np.testing.assert_allclose(
        rows[["p_no", "p_yes"]][:2].to_numpy(dtype=float), expected, atol=1e-6
    )
    # Two heads that disagree, away from 0 and 1: the mean is neither's answer.
    assert np.all((expected > 0.01) & (expected < 0.99))
    assert not np.allclose(each[0]["p_yes"][:2].to_numpy(float), expected[:, 1], atol=1e-3)
    assert rows["label"][:2].tolist() == ["yes" if p >= 0.5 else "no" for p in expected[:, 1]]
    assert rows["error"][:2].isna().all()
    assert rows["p_yes"][2] is None and rows["error"][2]


def test_ensemble_scores_its_taps_from_one_pass(scorers):
    ensemble, _ = scorers
    assert ensemble.spec.taps == ("gap5", "gap4")
    pixels = np.random.default_rng(3).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    side_by_side = ensemble.extractor(pixels)  # what `emotr predict`'s actors hand the heads
    assert side_by_side.shape == (3, 1024)
    by_name = ensemble.extractor.extract_outputs(pixels)
    np.testing.assert_allclose(
        ensemble.score_features(side_by_side), ensemble.score_features(by_name), atol=1e-12
    )
    # A cached matrix of one fingerprint (gap5 alone) is not what the ensemble reads.
    with pytest.raises(ValueError, match=r"taps gap5\+gap4 side by side \(1024 columns\)"):
        ensemble.score_features(by_name["gap5"])
    with pytest.raises(ValueError, match=r"missing \['gap4'\]"):
        ensemble.score_features({"gap5": by_name["gap5"]})


def test_spec_without_members_is_a_single_head_and_members_must_fit():
    old = _spec(GAP5, 512).model_dump_json(exclude={"members"})  # a version from before
    assert ServingSpec.model_validate_json(old).members == ()
    member = HeadSpec(head=GAP45, n_features=1024)
    with pytest.raises(ValidationError, match="first member's"):
        _spec(GAP5, 512, (member,))
    tuned = HeadSpec(head=HeadParams(finetune=True), n_features=512)
    with pytest.raises(ValidationError, match="fine-tuned heads"):
        _spec(tuned.head, 512, (tuned, member))


def test_explain_refuses_an_ensemble_before_any_work(scorers):
    ensemble, singles = scorers
    assert map_grid(singles[1].spec) == (2, 2)  # gap4 of 32x32
    with pytest.raises(CamError, match="explain the version of one of its trials"):
        map_grid(ensemble.spec)
