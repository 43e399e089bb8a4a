"""Cached activations: a pooled VGG feature map per image (extract.cache_activation), bfloat16.

The map of `block4_pool` is what blocks 1-4 make of an image: caching it once lets trials train
block 5 (and a head) on it without running the frozen blocks every epoch. It is stored beside
the features, under the same rules: Parquet parts keyed by the image's sha256, written by the
extraction driver alone, committed atomically, in a folder fingerprinted by gap5's inputs plus
the activation's name, shape and dtype (so `emotr cache ls/verify/gc/compact` see it too).

Each row holds the map's bfloat16 bytes (a fixed-size binary column, row-major (h, w, c)):
2 * h * w * c bytes per image before compression. block4_pool is (H/16, W/16, 512):
14 x 14 x 512 -> 200,704 B at 224x224, 25 x 31 x 512 -> 793,600 B at 400x500.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_dtypes
import numpy as np
import pyarrow as pa

from emotr.cache.fingerprint import CacheKey, fingerprint_of
from emotr.cache.store import CacheMiss, FeatureCache, read_inputs
from emotr.taps import activation_shape

STORED_DTYPE = "bfloat16"
_BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


class ActivationsMissing(CacheMiss):
    """Activations asked for that the cache does not hold; the message says how to cache them."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def activation_schema(n_bytes: int, metadata: dict[bytes, bytes] | None = None) -> pa.Schema:
    """The Parquet schema of a part holding one `n_bytes` activation per image."""
    fields = [
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("activation", pa.binary(n_bytes), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
    ]
    return pa.schema(fields, metadata=metadata)


def activation_inputs(inputs: dict[str, str], name: str, shape: Sequence[int]) -> dict[str, str]:
    """The inputs of an activation's folder, from those of gap5's (the cache's identity)."""
    own = {key: value for key, value in inputs.items() if key != "feature_dim"}
    return {
        **own,
        "activation": name,
        "activation_shape": "x".join(map(str, shape)),
        "activation_dtype": STORED_DTYPE,
    }


class ActivationCache(FeatureCache):
    """One activation per image, as bfloat16 bytes; load() gives float32 (n, h, w, c)."""

    value_column = "activation"

    def __init__(self, root: str, fingerprint: str, inputs: dict[str, str]):
        super().__init__(root, fingerprint, inputs)
        self.shape = tuple(int(n) for n in inputs["activation_shape"].split("x"))
        self.n_bytes = int(np.prod(self.shape)) * _BFLOAT16.itemsize

    @classmethod
    def of(cls, root: str, fingerprint: str, inputs: dict[str, str], name: str, shape):
        """The activation cache beside the features of gap5's fingerprint and inputs."""
        own = activation_inputs(inputs, name, shape)
        return cls(root, fingerprint_of(own), own)

    def _checked(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values)
        if values.dtype == np.uint16:  # bfloat16 bits, as the extractor actors ship them
            values = values.view(_BFLOAT16)
        if values.shape[1:] != self.shape:
            raise ValueError(f"activations must be (n, {self.shape}), got {values.shape}")
        values = values.astype(_BFLOAT16)
        if not np.isfinite(values.astype(np.float32)).all():
            raise ValueError("activations hold NaN or infinite values; refusing to cache them")
        return values

    def _schema(self, metadata: dict[bytes, bytes] | None = None) -> pa.Schema:
        return activation_schema(self.n_bytes, metadata)

    def _encode(self, values: np.ndarray) -> tuple[pa.Array, pa.Schema]:
        data = np.ascontiguousarray(values).reshape(len(values), -1).view(np.uint8)
        buffer = pa.py_buffer(data.reshape(-1))
        array = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(self.n_bytes), len(values), [None, buffer]
        )
        return array, activation_schema(self.n_bytes)

    def _decode(self, column: pa.Array) -> np.ndarray:
        if len(column) == 0:
            return np.zeros((0, *self.shape), np.float32)
        # A fixed-size binary array's data buffer holds the rows back to back.
        data = np.frombuffer(column.buffers()[1], dtype=np.uint8)
        start = column.offset * self.n_bytes
        rows = data[start : start + len(column) * self.n_bytes].view(_BFLOAT16)
        return rows.reshape(len(column), *self.shape)

    def _write_options(self) -> dict:
        # Statistics and dictionaries of 200 KB values cost space and buy nothing.
        return {"write_statistics": ["sha256", "height", "width"], "use_dictionary": ["sha256"]}

    def load_bfloat16(self, sha256s: Sequence[str]) -> np.ndarray:
        """Activations (n, h, w, c) as stored (bfloat16), in the order of `sha256s`.

        Raises ActivationsMissing, saying how to cache them, when some are not cached.
        """
        try:
            return super().load(sha256s)
        except CacheMiss as error:
            name = self.inputs["activation"]
            n_missing = len(set(sha256s) - self.cached_hashes())
            raise ActivationsMissing(
                f"{n_missing} of {len(sha256s)} images have no cached {name} activation in "
                f"{self.location}; run `emotr extract` with extract.cache_activation: {name} "
                "(and the same backbone and decode settings)"
            ) from error

    def load(self, sha256s: Sequence[str]) -> np.ndarray:
        """Activations (n, h, w, c) float32 (exactly the stored bfloat16 values).

        float32 holds the stored bfloat16 values exactly (4 bytes a value in memory: 401,408 B
        per image at 224x224).
        """
        return self.load_bfloat16(sha256s).astype(np.float32)


def open_activation_cache(
    key: CacheKey, name: str | None, input_size: Sequence[int]
) -> ActivationCache:
    """The cache of activation `name` (extract.cache_activation) beside the features of `key`."""
    if name is None:
        raise ActivationsMissing(
            "no activation is configured; run `emotr extract` with "
            "extract.cache_activation: block4_pool"
        )
    shape = activation_shape(name, input_size)
    return ActivationCache.of(key.root, key.fingerprint, dict(key.inputs), name, shape)


def open_cache(root: str, fingerprint: str) -> FeatureCache:
    """Any existing folder of the cache, as what it holds: features or an activation."""
    inputs = read_inputs(root, fingerprint)
    if "activation" in inputs:
        return ActivationCache(root, fingerprint, inputs)
    return FeatureCache(root, fingerprint, inputs)
