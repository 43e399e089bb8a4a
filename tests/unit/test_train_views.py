"""Heads trained on cached augmented views: one view per row and epoch, training rows only."""

from __future__ import annotations

import numpy as np
import pytest

from emotr.hyperparams import HeadParams
from emotr.search.head import fit_head
from emotr.search.training_set import FeatureSet, view_features

HEAD = HeadParams(n_layers=0, learning_rate=1e-2, early_stopping=False, batch_size=32)


def signal(rng: np.random.Generator, y: np.ndarray, d: int = 32) -> np.ndarray:
    x = rng.normal(size=(len(y), d)).astype(np.float32)
    x[:, :4] += 1.5 * (2 * y[:, None] - 1)
    return x


def test_a_head_with_train_views_learns_from_the_views():
    """Plain training rows hold no signal, their views do: only a head that reads views learns."""
    rng = np.random.default_rng(0)
    y = np.arange(300) % 2
    plain = rng.normal(size=(300, 32)).astype(np.float32)
    views = np.stack([signal(rng, y) for _ in range(4)], axis=1)
    y_val = np.arange(200) % 2
    x_val = signal(rng, y_val)
    args = {"epochs": 20, "patience": 5, "seed": 0}
    without = fit_head(HEAD, plain, y, x_val, y_val, **args)
    with_views = HEAD.model_copy(update={"train_views": True})
    learned = fit_head(with_views, plain, y, x_val, y_val, x_views=views, **args)
    assert learned.metrics["val_auc"] > 0.9
    assert without.metrics["val_auc"] < 0.75


def test_train_views_without_cached_views_says_how_to_cache_them():
    rng = np.random.default_rng(0)
    y = np.arange(40) % 2
    x = signal(rng, y)
    with pytest.raises(ValueError, match=r"extract\.views"):
        fit_head(HEAD.model_copy(update={"train_views": True}), x, y, x, y, epochs=1, patience=1)


def test_a_features_choice_reads_each_view_of_its_taps():
    rng = np.random.default_rng(0)
    views = {"gap5": rng.random((6, 3, 512)), "gap4": rng.random((6, 3, 512))}
    combined = view_features("gap4+gap5_flipavg", views)
    assert combined.shape == (6, 3, 1024)
    # A view is mirrored at random already: its flipavg term is that view's tap itself.
    assert np.allclose(combined[:, 2, 512:], views["gap5"][:, 2])
    assert np.allclose(combined[:, 1, :512], views["gap4"][:, 1])
    assert view_features("gap3", views) is None


def test_select_carries_the_views_of_the_choice():
    rng = np.random.default_rng(1)
    y = np.arange(8) % 2
    taps = {"gap5": rng.random((8, 512)).astype(np.float32)}
    taps["gap4"] = rng.random((8, 512)).astype(np.float32)
    views = {tap: rng.random((8, 2, 512)).astype(np.float32) for tap in taps}
    features = FeatureSet(
        x_train=taps["gap5"],
        y_train=y,
        x_val=taps["gap5"],
        y_val=y,
        fingerprint="f",
        split_digest="d",
        taps_train=taps,
        taps_val=taps,
        views_train=views,
        views_val=views,
    )
    chosen = features.select("gap4+gap5")
    assert chosen.x_views_train.shape == (8, 2, 1024)
    assert chosen.pooled_views().shape == (16, 2, 1024)
    assert features.select("gap5").x_views_train.shape == (8, 2, 512)
