"""Content-addressed Parquet feature cache: ROOT/<fingerprint>/part-<hash>.parquet.

The fingerprint hashes everything that changes a feature (backbone, weights, input size,
precision, decode rules), so a changed setting writes to a new folder and never mixes features.
Rows are keyed by the sha256 of the image bytes: renamed or duplicated files cost nothing.
Parts are written under a `_tmp-*` name and then renamed (local) or copied server-side (object
stores) into place, so a reader (who only reads `part-*.parquet`) never sees half a part.
Two drivers extracting at once may both write a row: readers keep one row per sha256, and
`compact_cache` merges the copies.

Feature taps (emotr.taps) other than gap5 live in folders of their own (emotr.cache.fingerprint):
a new tap adds a folder and never invalidates what is cached.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from emotr.cache.fingerprint import canonical_json, fingerprint_of, tap_inputs
from emotr.errors import EmotrError
from emotr.storage import is_uri, join, put_atomically, resolve
from emotr.taps import DEFAULT_TAP

INPUTS_FILE = "fingerprint.json"
_META_FINGERPRINT = b"emotr.fingerprint"
_META_INPUTS = b"emotr.inputs"


class CacheMiss(EmotrError, KeyError):
    """Features asked for that the cache does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def part_name(sha256s: Iterable[str]) -> str:
    """A part's file name: the hash of its sorted row keys, so a retried commit reuses it."""
    digest = hashlib.sha256("\n".join(sorted(sha256s)).encode()).hexdigest()
    return f"part-{digest[:16]}.parquet"


def feature_schema(dim: int, metadata: dict[bytes, bytes] | None = None) -> pa.Schema:
    """The Parquet schema of a part holding `dim` features per image."""
    fields = [
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("features", pa.list_(pa.float32(), dim), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
    ]
    return pa.schema(fields, metadata=metadata)


class FeatureCache:
    """The features of one fingerprint; concurrent writers are safe (readers de-duplicate).

    Subclasses store other per-image values (emotr.cache.activations) by overriding the `_encode`,
    `_decode` and `_schema` of the value column.
    """

    value_column = "features"

    def __init__(self, root: str, fingerprint: str, inputs: dict[str, str]):
        self.root = root
        self.fingerprint = fingerprint
        self.inputs = dict(inputs)
        self.location = join(root, fingerprint)
        # The filesystem and the folder on it that hold this fingerprint's files.
        self.filesystem, self.folder = resolve(self.location)
        self._known: set[str] | None = None
        self._listed: pa.Array | None = None

    @classmethod
    def open(cls, root: str, fingerprint: str) -> FeatureCache:
        """An existing cache of this class, its inputs read back from fingerprint.json (any
        folder, activations included: emotr.cache.activations.open_cache)."""
        return cls(root, fingerprint, read_inputs(root, fingerprint))

    def part_paths(self) -> list[str]:
        """Paths (on this cache's filesystem) of the committed parts."""
        files = list_files(self.filesystem, self.folder)
        return [info.path for info in files if is_part_name(info.base_name)]

    def cached_hashes(self) -> set[str]:
        """The sha256 of every image the cache holds features for (each once)."""
        self._listed = self._read_hashes()
        self._known = set(self._listed.to_pylist())
        return set(self._known)

    def known_hashes(self) -> set[str]:
        """The hashes cached, as last listed (listed once) plus those committed since."""
        if self._known is None:
            self._known = set(self._listed_hashes().to_pylist())
        return self._known

    def known_hash_array(self) -> pa.Array:
        """known_hashes as an Arrow string array (rows committed twice may repeat)."""
        # A warm run only asks membership (pyarrow.compute.is_in): it never needs the Python
        # set of 100k strings that commits keep (0.02 s to build, 0.04 s for pandas isin).
        if self._known is not None:
            return pa.array(list(self._known), pa.string())
        return self._listed_hashes()

    def _listed_hashes(self) -> pa.Array:
        if self._listed is None:
            self._listed = self._read_hashes()
        return self._listed

    def _read_hashes(self) -> pa.Array:
        paths = self.part_paths()
        if not paths:
            return pa.array([], pa.string())
        dataset = pads.dataset(paths, filesystem=self.filesystem, format="parquet")
        return dataset.to_table(["sha256"]).column("sha256").combine_chunks()

    def commit(
        self,
        sha256s: Sequence[str],
        features: np.ndarray,
        heights: Sequence[int],
        widths: Sequence[int],
    ) -> int:
        """Atomically write the rows not cached yet as one part; returns the rows written."""
        self.known_hashes()
        assert self._known is not None
        features = self._checked(features)
        if not len(features) == len(sha256s) == len(heights) == len(widths):
            raise ValueError(
                f"commit needs one value, height and width per sha256; got "
                f"{len(sha256s)} hashes, values {features.shape}, {len(heights)} heights, "
                f"{len(widths)} widths"
            )
        keep, new = [], set()
        for index, key in enumerate(sha256s):
            if key not in self._known and key not in new:
                new.add(key)
                keep.append(index)
        if not keep:
            return 0
        rows = (
            [sha256s[i] for i in keep],
            features[keep],
            [heights[i] for i in keep],
            [widths[i] for i in keep],
        )
        table = self._table(*rows)
        self._write_inputs_file()
        self.publish_part(table)
        self._known.update(table.column("sha256").to_pylist())
        return table.num_rows

    def load(self, sha256s: Sequence[str]) -> np.ndarray:
        """Features (n, dim) float32 in the order of `sha256s`; raises CacheMiss for absent ones."""
        wanted = pa.array(list(sha256s), pa.string())
        paths = self.part_paths()
        columns = ["sha256", self.value_column]
        if paths:
            dataset = pads.dataset(paths, filesystem=self.filesystem, format="parquet")
            table = dataset.to_table(columns, filter=pc.field("sha256").isin(wanted))
        else:
            table = self._schema().empty_table().select(columns)
        # index_in answers the first match, so a row committed twice (by two drivers) is read once.
        index = pc.index_in(wanted, value_set=table.column("sha256"))
        n_missing = index.null_count
        if n_missing:
            raise CacheMiss(
                f"{n_missing} of {len(wanted)} images have no features in the cache "
                f"{self.location}; run `emotr extract` with the same backbone and decode settings"
            )
        values = self._decode(table.column(self.value_column).combine_chunks())
        return values[index.to_numpy()] if table.num_rows else values

    def _checked(self, values: np.ndarray) -> np.ndarray:
        """The values to commit as this cache stores them; ValueError if they cannot be."""
        features = np.asarray(values, dtype=np.float32)
        if features.ndim != 2:
            raise ValueError(f"features must be (n, dim), got {features.shape}")
        if not np.isfinite(features).all():
            raise ValueError("features hold NaN or infinite values; refusing to cache them")
        return features

    def _write_options(self) -> dict:
        """Keyword arguments of pq.write_table for this cache's parts."""
        return {}

    def _schema(self, metadata: dict[bytes, bytes] | None = None) -> pa.Schema:
        return feature_schema(0, metadata)

    def _encode(self, values: np.ndarray) -> tuple[pa.Array, pa.Schema]:
        """The value column of a part and the part's schema (without metadata)."""
        dim = values.shape[1]
        flat = pa.array(values.reshape(-1), pa.float32())
        return pa.FixedSizeListArray.from_arrays(flat, dim), feature_schema(dim)

    def _decode(self, column: pa.Array) -> np.ndarray:
        if len(column) == 0:
            return np.zeros((0, 0), np.float32)
        return column.flatten().to_numpy().reshape(len(column), column.type.list_size)

    def publish_part(self, table: pa.Table) -> str:
        """Write a table of rows as a part named after its rows, atomically; returns its path."""
        path = f"{self.folder}/{part_name(table.column('sha256').to_pylist())}"
        options = self._write_options()
        self._put(path, lambda stream: pq.write_table(table, stream, **options))
        return path

    def _table(self, keys, features, heights, widths) -> pa.Table:
        metadata = {
            _META_FINGERPRINT: self.fingerprint.encode(),
            _META_INPUTS: canonical_json(self.inputs).encode(),
        }
        values, schema = self._encode(features)
        columns = [
            pa.array(keys, pa.string()),
            values,
            pa.array(heights, pa.int32()),
            pa.array(widths, pa.int32()),
        ]
        return pa.Table.from_arrays(columns, schema=schema.with_metadata(metadata))

    def _write_inputs_file(self) -> None:
        path = f"{self.folder}/{INPUTS_FILE}"
        if self.filesystem.get_file_info(path).type == pafs.FileType.File:
            return
        self.filesystem.create_dir(self.folder, recursive=True)
        text = json.dumps(self.inputs, indent=2, sort_keys=True) + "\n"
        self._put(path, lambda stream: stream.write(text.encode()))

    def _put(self, final: str, write: Callable[[pa.NativeFile], object]) -> None:
        put_atomically(self.filesystem, final, write, remote=is_uri(self.location))


def is_part_name(name: str) -> bool:
    """True for the file names readers read (`part-*.parquet`)."""
    return name.startswith("part-") and name.endswith(".parquet")


def list_files(filesystem: pafs.FileSystem, folder: str) -> list[pafs.FileInfo]:
    """The files (not folders) directly in `folder`, sorted by name; none if it is absent."""
    selector = pafs.FileSelector(folder, allow_not_found=True)
    infos = filesystem.get_file_info(selector)
    return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.base_name)


def locate(location: str, filesystem: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    """`resolve(location)`, or `location` as a path on `filesystem` when one is given."""
    return resolve(location) if filesystem is None else (filesystem, location)


def list_fingerprints(root: str, filesystem: pafs.FileSystem | None = None) -> list[str]:
    """The fingerprint folders under `root`, sorted (`_*` folders, such as _listings, are not)."""
    filesystem, path = locate(root, filesystem)
    infos = filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    folders = (i.base_name for i in infos if i.type == pafs.FileType.Directory)
    return sorted(name for name in folders if not name.startswith("_"))


def read_inputs(
    root: str, fingerprint: str, filesystem: pafs.FileSystem | None = None
) -> dict[str, str]:
    """The inputs a fingerprint hashes, from its fingerprint.json; {} when that is absent."""
    filesystem, path = locate(join(root, fingerprint, INPUTS_FILE), filesystem)
    try:
        with filesystem.open_input_stream(path) as stream:
            return json.loads(stream.read())
    except FileNotFoundError:
        return {}


def open_tap(root: str, fingerprint: str, inputs: dict[str, str], tap: str) -> FeatureCache:
    """The cache of one tap, given gap5's fingerprint and inputs."""
    if tap == DEFAULT_TAP:
        return FeatureCache(root, fingerprint, inputs)
    own = tap_inputs(inputs, tap)
    return FeatureCache(root, fingerprint_of(own), own)
