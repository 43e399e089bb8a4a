"""Deep fine-tuning end to end on the smoke set: extract with the block4_pool activation, a
search whose trials fine-tune block 5, the registered image-in model, its probabilities."""

import os
import re
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from emotr import pipeline
from emotr.config_io import load_config
from emotr.deploy.registry import load_validation_set
from emotr.extract.fingerprint import cache_key
from emotr.search.finetune_set import load_finetune_set
from emotr.search.gpus import EPOCH_SECONDS
from emotr.search.training_set import load_feature_set
from emotr.track import Tracker
from tests.conftest import SMOKE, smoke_config, store_overrides
from tests.run_cli import RAY_NOISE, emotr

pytestmark = pytest.mark.slow

MODEL = "emotr-finetune"


def test_a_finetuned_trial_registers_a_model_serving_its_probabilities(
    tmp_path: Path, ray_local, fluent_uri
):
    mlflow_server = fluent_uri
    cfg = smoke_config(
        tmp_path,
        f"mlflow.tracking_uri={mlflow_server}",
        "mlflow.experiment=finetune",
        f"registry.model_name={MODEL}",
        "data.demo_n=40",  # 8 validation images
        "extract.cache_activation=block4_pool",
        "tune.baseline.finetune=true",
        "tune.baseline.finetune_epochs=3",
        "tune.baseline.learning_rate=0.001",
        "tune.search_space={finetune_lr_scale: {type: float, low: 0.1, high: 1.0, log: true}}",
        "tune.n_trials=2",
    )
    tracker = Tracker(cfg.mlflow)
    listing = pipeline.prepare_listing(cfg)
    result = pipeline.run(cfg, tracker, listing)

    client = MlflowClient(mlflow_server)
    version = client.get_model_version_by_alias(MODEL, "challenger")
    assert str(version.version) == result.model_version
    assert version.tags["activation"] == "block4_pool"
    # Its cached gap5 features are not what it takes: predict and the gate must decode.
    assert "feature_fingerprint" not in version.tags

    # Per-epoch curves: the head's epochs, then the joint ones.
    run = client.get_run(version.run_id)
    first_joint = int(run.data.metrics["finetune_from_epoch"])
    losses = client.get_metric_history(version.run_id, "loss")
    assert first_joint >= 2 and len(losses) >= first_joint
    assert sorted(m.step for m in losses) == list(range(1, len(losses) + 1))
    assert run.data.params["finetune"] == "True"

    # The registered model, loaded as anyone would, on the validation images' files...
    served = mlflow.pyfunc.load_model(f"models:/{MODEL}/{version.version}")
    validation = load_validation_set(tracker, version)
    rows = served.predict(pd.DataFrame({"path": validation["path"]}))
    assert rows["error"].isna().all()
    # ... against the trial's own model on the cached activations.
    features = load_feature_set(
        cfg.cache.root, cfg.tune, listing, version.tags["activation_fingerprint"]
    )
    tuning = load_finetune_set(
        cache_key(cfg.cache, cfg.backbone, cfg.decode),
        cfg.backbone,
        cfg.extract.cache_activation,
        listing,
        features,
    )
    order = listing.val().set_index("sha256").loc[validation["sha256"]]
    assert (order["label"].to_numpy() == tuning.y_val).all()
    trial_model = mlflow.keras.load_model(f"runs:/{version.run_id}/model")
    trained = np.asarray(trial_model(np.asarray(tuning.a_val, np.float32), training=False))
    np.testing.assert_allclose(
        rows["p_positive"].to_numpy(dtype=float), trained.reshape(-1), atol=1e-4
    )
    # The trial logged the same validation numbers as the registered model gives.
    assert run.data.metrics["val_auc"] == pytest.approx(float(version.tags["val_auc"]), abs=1e-6)


def test_run_on_a_ray_with_a_gpu_also_searches_finetuning_there(tmp_path: Path):
    """`emotr run` on a private Ray that declares one GPU (Ray schedules by the count; here
    TensorFlow runs on the CPU): the search space gains finetune, block4_pool is cached for it,
    the trials that fine-tune hold tune.gpus_per_finetune_trial of it and the frozen ones none,
    and the console gives what an epoch of fine-tuning cost."""
    paths = [f"data.root={tmp_path / 'data'}", *store_overrides(tmp_path)]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}

    done = emotr(
        "run", "-c", str(SMOKE), *paths, "ray.num_gpus=1", "data.demo_n=40",
        "tune.n_trials=5", "tune.baseline.finetune_epochs=2", "tune.gpus_per_finetune_trial=0.5",
        "registry.auto_promote=false",
        env=env, timeout=900,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert "the Ray cluster has 1 GPU(s): the search also fine-tunes block 5" in done.stdout
    assert "extracted gap5+block4_pool of 40 images" in done.stdout + done.stderr
    assert not RAY_NOISE.search(done.stdout + done.stderr)
    cost = re.search(r"fine-tuning block 5: (\d+) trial\(s\), ([\d.]+) s per epoch", done.stdout)
    assert cost, done.stdout
    cfg = load_config([SMOKE], paths)
    client = MlflowClient(cfg.mlflow.tracking_uri)
    trials = client.search_runs(
        [client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id],
        "tags.`emotr.role` = 'trial'",
    )
    finetuned = [run for run in trials if run.data.params["finetune"] == "True"]
    frozen = [run for run in trials if run.data.params["finetune"] == "False"]
    assert len(finetuned) == int(cost.group(1)) and frozen
    assert all(run.data.metrics["gpus"] == 0.5 for run in finetuned)
    assert all(run.data.metrics["gpus"] == 0 for run in frozen)
    seconds = [run.data.metrics[EPOCH_SECONDS] for run in finetuned]
    assert float(cost.group(2)) == pytest.approx(float(np.median(seconds)), abs=0.06)
    assert not any(EPOCH_SECONDS in run.data.metrics for run in frozen)
