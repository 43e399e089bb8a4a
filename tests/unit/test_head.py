"""fit_head on small synthetic features: it learns, stops early (or trains every epoch, as the
tutorial's recipe does), standardises on train only; the recipe's head is the notebook's."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from emotr.config_io import load_config
from emotr.hyperparams import MAX_HEAD_LAYERS
from emotr.search import metrics
from emotr.search.head import HeadParams, build_head, fit_head

BASE = HeadParams(
    n_layers=1,
    units=32,
    activation="relu",
    dropout=0.2,
    l2=0.0,
    learning_rate=3e-3,
    batch_size=32,
    standardize=False,
    class_weight=False,
    # The searched trials' procedure (the defaults are trial 0's, the tutorial's).
    kernel_init="glorot_uniform",
    early_stopping=True,
)
CLASSES = ("negative", "positive")
METRICS = {
    "val_auc",
    "val_accuracy",
    "val_precision",
    "val_recall",
    "val_f1",
    "val_log_loss",
    "val_balanced_accuracy",
    "best_epoch",
}
# Per class, by the default class names.
METRICS |= {f"val_{kind}_{name}" for kind in ("auc", "precision", "recall") for name in CLASSES}
HISTORY = {"loss", "accuracy", "val_loss", "val_accuracy", "val_auc"}


def separable(n: int = 400, d: int = 512, noise: float = 0.0, offset: float = 0.0, seed: int = 0):
    """Gaussian features whose class means differ along 16 of the 512 dimensions.

    `noise` flips that share of the labels, so that the validation AUC peaks and then decays.
    """
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(np.int32)
    rng.shuffle(y)
    x = rng.normal(loc=offset, scale=1.0, size=(n, d)).astype(np.float32)
    x[:, :16] += np.where(y[:, None] == 1, 0.5, -0.5).astype(np.float32)
    flip = rng.random(n) < noise
    y = np.where(flip, 1 - y, y).astype(np.int32)
    cut = int(0.75 * n)
    return x[:cut], y[:cut], x[cut:], y[cut:]


def replace(params: HeadParams, **changes) -> HeadParams:
    return HeadParams(**{**params.model_dump(), **changes})


def test_learns_separable_features_with_full_history_and_metrics():
    x_train, y_train, x_val, y_val = separable()

    result = fit_head(BASE, x_train, y_train, x_val, y_val, epochs=5, patience=5)

    assert result.metrics["val_auc"] > 0.9
    assert set(result.metrics) == METRICS
    assert set(result.history) == HISTORY
    n_epochs = len(result.history["loss"])
    assert all(len(values) == n_epochs for values in result.history.values())
    assert result.confusion.shape == (2, 2) and result.confusion.sum() == len(y_val)
    assert result.val_proba.shape == (len(y_val), 2)
    fpr, tpr, _ = result.roc[1]
    assert fpr[0] == 0 and tpr[-1] == 1
    assert result.train_seconds > 0


def test_early_stopping_restores_the_best_epoch():
    # Noisy labels and a high learning rate: val AUC peaks early, then the head overfits.
    x_train, y_train, x_val, y_val = separable(noise=0.3, seed=1)
    params = replace(BASE, units=128, dropout=0.0, learning_rate=1e-2)

    result = fit_head(params, x_train, y_train, x_val, y_val, epochs=40, patience=2)

    curve = result.history["val_auc"]
    best_epoch = int(result.metrics["best_epoch"])
    assert len(curve) < 40, "patience 2 should stop before 40 epochs on noisy labels"
    assert 1 <= best_epoch <= len(curve)
    assert best_epoch == int(np.argmax(curve)) + 1
    assert result.metrics["val_auc"] == pytest.approx(max(curve), abs=1e-6)
    assert metrics.evaluate(y_val, result.val_proba, ("n", "p"))["val_auc"] == pytest.approx(
        max(curve), abs=1e-6
    )


def test_without_early_stopping_every_epoch_trains_and_the_last_is_kept():
    # The data and head of the test above, where patience 2 stops early: the tutorial's
    # procedure trains on and scores the model after its last epoch, not the best one.
    x_train, y_train, x_val, y_val = separable(noise=0.3, seed=1)
    params = replace(BASE, units=128, dropout=0.0, learning_rate=1e-2, early_stopping=False)

    result = fit_head(params, x_train, y_train, x_val, y_val, epochs=12, patience=2)

    curve = result.history["val_auc"]
    assert all(len(values) == 12 for values in result.history.values())
    assert result.metrics["val_auc"] == pytest.approx(curve[-1], abs=1e-6)
    assert result.metrics["val_auc"] < max(curve), "overfitting: the last epoch is not the best"
    assert result.metrics["best_epoch"] == int(np.argmax(curve)) + 1  # where the curve peaked
    scores = np.asarray(result.model(x_val, training=False)).reshape(-1)
    np.testing.assert_allclose(scores, result.val_proba[:, 1], rtol=1e-5, atol=1e-6)


def test_l2_reaches_a_linear_heads_only_kernel():
    """n_layers 0: the output layer is the head, so l2 must penalise it (ridge, not a no-op)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 32)).astype(np.float32)
    y = (x[:, 0] + rng.normal(size=64) > 0).astype(np.int32)
    norms = {}
    for l2 in (0.0, 0.3):
        params = HeadParams(n_layers=0, l2=l2, learning_rate=1e-2, early_stopping=False)
        model = fit_head(
            params, x[:48], y[:48], x[48:], y[48:], epochs=40, patience=40, seed=0
        ).model
        score = model.get_layer("score")
        assert (score.kernel_regularizer is None) == (l2 == 0)
        norms[l2] = float(np.linalg.norm(score.get_weights()[0]))
    assert norms[0.3] < 0.5 * norms[0.0]


def test_the_recipe_head_is_the_notebooks():
    """GAP features -> Dense(512, relu, he_normal) -> Dropout(0.5) -> Dense(1, sigmoid)."""
    model = build_head(HeadParams(), n_features=512)

    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["InputLayer", "Dense", "Dropout", "Dense"]  # no Normalization (standardize)
    hidden, dropout, score = model.layers[1:]
    assert (hidden.units, hidden.activation.__name__) == (512, "relu")
    assert isinstance(hidden.kernel_initializer, keras.initializers.HeNormal)
    assert hidden.kernel_regularizer is None  # l2 0
    assert dropout.rate == 0.5
    assert (score.units, score.activation.__name__) == (1, "sigmoid")
    # Keras' default, as the notebook's Dense(1, sigmoid) has it.
    assert isinstance(score.kernel_initializer, keras.initializers.GlorotUniform)
    # The notebook's head (GAP has no weights): 512 x 512 + 512, then 512 + 1.
    assert model.count_params() == 263_169


@pytest.mark.parametrize(
    ("kernel_init", "initializer"),
    [
        ("he_normal", keras.initializers.HeNormal),
        ("glorot_uniform", keras.initializers.GlorotUniform),
    ],
)
def test_kernel_init_sets_the_hidden_layers_initializer(kernel_init, initializer):
    model = build_head(replace(BASE, n_layers=2, kernel_init=kernel_init), n_features=16)

    for name in ("dense_0", "dense_1"):
        assert isinstance(model.get_layer(name).kernel_initializer, initializer)


def test_on_epoch_end_sees_every_epoch_and_can_stop_training():
    x_train, y_train, x_val, y_val = separable(n=200)
    seen: list[tuple[int, float]] = []

    def report(epoch: int, logs: dict) -> bool:
        seen.append((epoch, logs["val_auc"]))
        return epoch == 2

    result = fit_head(
        BASE, x_train, y_train, x_val, y_val, epochs=5, patience=5, on_epoch_end=report
    )

    assert [epoch for epoch, _ in seen] == [1, 2]
    assert result.stopped_by_callback
    assert [auc for _, auc in seen] == result.history["val_auc"]


def test_standardization_is_adapted_on_train_features_only():
    x_train, y_train, x_val, y_val = separable(n=200, offset=3.0)
    x_val = x_val + 10.0  # a shifted validation set must not move the layer's statistics

    result = fit_head(
        replace(BASE, standardize=True), x_train, y_train, x_val, y_val, epochs=2, patience=2
    )

    layer = result.model.get_layer("standardize")
    mean = np.asarray(layer.mean).reshape(-1)
    variance = np.asarray(layer.variance).reshape(-1)
    np.testing.assert_allclose(mean, x_train.mean(axis=0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(variance, x_train.var(axis=0), rtol=1e-3, atol=1e-3)


def test_class_weights_change_training_on_imbalanced_labels():
    x_train, y_train, x_val, y_val = separable(n=300, seed=2)
    keep = (y_train == 1) | (np.arange(len(y_train)) % 4 == 0)  # ~1 negative for 4 positives
    x_train, y_train = x_train[keep], y_train[keep]

    plain = fit_head(BASE, x_train, y_train, x_val, y_val, epochs=3, patience=3)
    weighted = fit_head(
        replace(BASE, class_weight=True), x_train, y_train, x_val, y_val, epochs=3, patience=3
    )

    assert set(weighted.metrics) == METRICS
    assert not np.allclose(plain.history["loss"], weighted.history["loss"])


def test_same_seed_gives_the_same_head():
    x_train, y_train, x_val, y_val = separable(n=200)

    first = fit_head(BASE, x_train, y_train, x_val, y_val, epochs=2, patience=2, seed=3)
    second = fit_head(BASE, x_train, y_train, x_val, y_val, epochs=2, patience=2, seed=3)

    np.testing.assert_allclose(first.val_proba, second.val_proba, rtol=1e-6)


@pytest.mark.parametrize("n_layers", [0, MAX_HEAD_LAYERS])
def test_build_head_layer_count(n_layers):
    model = build_head(replace(BASE, n_layers=n_layers), n_features=16)

    dense = [layer for layer in model.layers if layer.name.startswith("dense_")]
    assert len(dense) == n_layers
    assert model.output_shape == (None, 1)


def test_bad_params_name_the_problem():
    with pytest.raises(ValueError, match="nonexistent"):
        build_head(replace(BASE, activation="nonexistent"), n_features=8)
    with pytest.raises(ValueError, match="standardize"):
        build_head(replace(BASE, standardize=True), n_features=8)


def test_head_params_are_one_typed_schema_with_the_tutorial_defaults():
    assert HeadParams() == load_config().tune.baseline
    assert HeadParams(units="64").units == 64  # YAML and Optuna values are coerced once
    with pytest.raises(ValueError, match="n_layers"):
        HeadParams(n_layers=MAX_HEAD_LAYERS + 1)  # deeper than build_head builds
    with pytest.raises(ValueError, match="dropout"):
        HeadParams(dropout=1.0)
    with pytest.raises(ValueError, match="extra"):
        HeadParams(n_layer=2)
    with pytest.raises(ValueError, match="frozen"):
        BASE.units = 8
    with pytest.raises(ValueError, match="kernel_init"):
        HeadParams(kernel_init="he_uniform")


def test_the_default_head_params_are_the_tutorials_recipe():
    recipe = HeadParams()

    assert (recipe.n_layers, recipe.units, recipe.activation) == (1, 512, "relu")
    assert (recipe.kernel_init, recipe.dropout, recipe.l2) == ("he_normal", 0.5, 0.0)
    assert (recipe.learning_rate, recipe.batch_size) == (1e-4, 32)
    assert not (recipe.standardize or recipe.class_weight or recipe.early_stopping)
    assert recipe.features == "gap5" and not recipe.finetune


def test_a_trial_head_fits_and_packs_quietly_into_a_loadable_mlflow_model(tmp_path, capfd):
    import io
    import tarfile

    import mlflow.pyfunc

    from emotr.track import keras_model_bytes

    x_train, y_train, x_val, y_val = separable(n=200, d=16)
    capfd.readouterr()

    result = fit_head(BASE, x_train, y_train, x_val, y_val, epochs=2, patience=2)
    packed = keras_model_bytes(result.model, x_val[:5])

    assert capfd.readouterr().out == ""  # no Keras progress bars from a trial's fit or packing
    with tarfile.open(fileobj=io.BytesIO(packed)) as archive:
        archive.extractall(tmp_path / "model", filter="data")
    model = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    assert model.metadata.signature is not None
    scores = np.asarray(model.predict(x_val[:4])).reshape(-1)
    np.testing.assert_allclose(scores, result.val_proba[:4, 1], rtol=1e-5, atol=1e-6)


def test_four_classes_get_a_softmax_head_and_macro_auc():
    rng = np.random.default_rng(3)
    centres = rng.normal(0, 1.0, (4, 512))
    y = rng.integers(0, 4, 480)
    x = (centres[y] + rng.normal(0, 3.0, (480, 512))).astype(np.float32)
    classes = ("angry", "happy", "sad", "surprise")
    params = replace(BASE, class_weight=True)

    result = fit_head(
        params, x[:400], y[:400], x[400:], y[400:], epochs=8, patience=8, classes=classes
    )

    assert result.model.output.shape[-1] == 4
    np.testing.assert_allclose(result.val_proba.sum(axis=1), 1.0, atol=1e-5)
    assert result.metrics["val_auc"] == pytest.approx(
        roc_auc_score(y[400:], result.val_proba, multi_class="ovr", average="macro"), abs=1e-9
    )
    assert result.metrics["val_auc"] > 0.9
    assert {f"val_auc_{name}" for name in classes} <= set(result.metrics)
    assert result.confusion.shape == (4, 4) and result.confusion.sum() == 80
    assert len(result.roc) == 4
    assert max(result.history["val_auc"]) == pytest.approx(result.metrics["val_auc"], abs=1e-6)
