"""The training set of the trials that fine-tune: the FeatureSet plus each image's cached
activation (extract.cache_activation) and the backbone's weights of the blocks above it.

Loaded on the search driver, which never imports Keras for itself: the backbone's weights are
read (emotr.search.finetune_model, which imports Keras) only when a trial may fine-tune.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from emotr.cache.activations import STORED_DTYPE, open_activation_cache
from emotr.cache.fingerprint import CacheKey
from emotr.cache.store import FeatureCache
from emotr.config import BackboneConfig, TuneConfig
from emotr.data.listing import Listing
from emotr.search.training_set import FeatureError, FeatureSet


@dataclass(frozen=True, kw_only=True)
class FineTuneSet(FeatureSet):
    """A FeatureSet plus each image's cached activation (rows in x_train/x_val's order)."""

    a_train: np.ndarray  # (n_train, h, w, c), any float dtype (bfloat16 as cached)
    a_val: np.ndarray
    activation: str  # the backbone layer they are the output of, e.g. block4_pool
    # The backbone's weights of the blocks above it, by layer name: where fine-tuning starts.
    block_weights: dict[str, list[np.ndarray]]
    backbone: str = "vgg16"  # backbone.name: how many convolutions those blocks have

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("train", "val"):
            a, y = getattr(self, f"a_{name}"), getattr(self, f"y_{name}")
            if a.ndim != 4 or len(a) != len(y):
                raise FeatureError(f"a_{name} {a.shape} must be (n, h, w, c) with n = {len(y)}")


def may_finetune(tune: TuneConfig) -> bool:
    """Whether a trial of the search may fine-tune (baseline or a search-space choice)."""
    return True in tune.searched("finetune")


def load_finetune_set(
    key: CacheKey,
    backbone: BackboneConfig,
    activation: str | None,
    listing: Listing,
    features: FeatureSet,
) -> FineTuneSet:
    """features plus the cached activations (`activation`: extract.cache_activation) of the
    same images, in the same order."""
    # Keras loads with the backbone's weights: only a search that may fine-tune pays for it.
    from emotr.search.finetune_model import backbone_block_weights

    if activation is None:
        raise FeatureError(
            "finetune=true needs extract.cache_activation (e.g. block4_pool); set it and run "
            "`emotr extract` again: it adds the activations without extracting features again"
        )
    # The rows load_feature_set took: listed, cached, by split, in listing order.
    cached = FeatureCache.open(key.root, features.fingerprint).cached_hashes()
    images = listing.images[listing.images["sha256"].isin(cached)]
    cache = open_activation_cache(key, activation, backbone.input_size)
    arrays = {}
    for split in ("train", "val"):
        rows = images[images["split"] == split]
        labels = rows["label"].to_numpy(np.int32)
        if not np.array_equal(labels, getattr(features, f"y_{split}")):
            raise FeatureError(f"the {split} rows of the listing and of the features differ")
        # Kept as cached (bfloat16, exact): half the memory of float32 in Ray's object store.
        activations = cache.load_bfloat16(rows["sha256"].tolist())
        arrays[split] = activations.astype(getattr(ml_dtypes, STORED_DTYPE))
    return FineTuneSet(
        **{name: getattr(features, name) for name in FeatureSet.__dataclass_fields__},
        a_train=arrays["train"],
        a_val=arrays["val"],
        activation=activation,
        block_weights=backbone_block_weights(backbone, activation),
        backbone=backbone.name,
    )
