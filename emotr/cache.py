"""Content-addressed Parquet feature cache: ROOT/<fingerprint>/part-<hash>.parquet.

The fingerprint hashes everything that changes a feature (backbone, weights, input size,
precision, decode rules), so a changed setting writes to a new folder and never mixes features.
Rows are keyed by the sha256 of the image bytes: renamed or duplicated files cost nothing.
Parts are written under a `_tmp-*` name and renamed into place, so a reader (who only reads
`part-*.parquet`) never sees half a part; on object stores the single upload is atomic already.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from emotr.config import BackboneConfig, DecodeConfig
from emotr.errors import EmotrError
from emotr.storage import is_uri, join, resolve

CACHE_FORMAT = "1"
INPUTS_FILE = "fingerprint.json"
_META_FINGERPRINT = b"emotr.fingerprint"
_META_INPUTS = b"emotr.inputs"


class CacheMiss(EmotrError, KeyError):
    """Features asked for that the cache does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class CacheInfo:
    fingerprint: str
    n_rows: int
    n_bytes: int
    n_parts: int
    inputs: dict[str, str]


def _canonical(inputs: dict[str, str]) -> str:
    return json.dumps(inputs, sort_keys=True, separators=(",", ":"))


def fingerprint_of(inputs: dict[str, str]) -> str:
    """First 16 hex digits of the sha256 of the inputs' canonical JSON."""
    return hashlib.sha256(_canonical(inputs).encode()).hexdigest()[:16]


def compute_fingerprint(
    backbone: BackboneConfig, decode: DecodeConfig
) -> tuple[str, dict[str, str]]:
    """The cache fingerprint and the inputs it hashes (extractor identity + decode rules)."""
    # Imported here so that reading features does not import TensorFlow.
    from emotr.backbone import extractor_inputs
    from emotr.imageio import decode_rules

    inputs = {**extractor_inputs(backbone), **decode_rules(decode), "cache_format": CACHE_FORMAT}
    inputs = {key: str(value) for key, value in inputs.items()}
    return fingerprint_of(inputs), inputs


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
    """The features of one fingerprint; the extract driver is its single writer."""

    def __init__(self, root: str, fingerprint: str, inputs: dict[str, str]):
        self.root = root
        self.fingerprint = fingerprint
        self.inputs = dict(inputs)
        self.location = join(root, fingerprint)
        self._fs, self._dir = resolve(self.location)
        self._known: set[str] | None = None

    @classmethod
    def open(cls, root: str, fingerprint: str) -> FeatureCache:
        """An existing cache, its inputs read back from fingerprint.json."""
        return cls(root, fingerprint, _read_inputs(root, fingerprint))

    def part_paths(self) -> list[str]:
        """Paths (on this cache's filesystem) of the committed parts."""
        return [info.path for info in _list_files(self._fs, self._dir) if _is_part(info.base_name)]

    def cached_hashes(self) -> set[str]:
        """The sha256 of every image the cache holds features for."""
        paths = self.part_paths()
        if not paths:
            self._known = set()
        else:
            table = pads.dataset(paths, filesystem=self._fs, format="parquet").to_table(["sha256"])
            self._known = set(table.column("sha256").to_pylist())
        return set(self._known)

    def commit(
        self,
        sha256s: Sequence[str],
        features: np.ndarray,
        heights: Sequence[int],
        widths: Sequence[int],
    ) -> int:
        """Atomically write the rows not cached yet as one part; returns the rows written."""
        if self._known is None:
            self.cached_hashes()
        assert self._known is not None
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or not len(features) == len(sha256s) == len(heights) == len(widths):
            raise ValueError(
                f"commit needs one (n, dim) feature row, height and width per sha256; got "
                f"{len(sha256s)} hashes, features {features.shape}, {len(heights)} heights, "
                f"{len(widths)} widths"
            )
        if not np.isfinite(features).all():
            raise ValueError("features hold NaN or infinite values; refusing to cache them")
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
        self._write_atomically(table, part_name(table.column("sha256").to_pylist()))
        self._known.update(table.column("sha256").to_pylist())
        return table.num_rows

    def load(self, sha256s: Sequence[str]) -> np.ndarray:
        """Features (n, dim) float32 in the order of `sha256s`; raises CacheMiss for absent ones."""
        wanted = pa.array(list(sha256s), pa.string())
        paths = self.part_paths()
        if paths:
            dataset = pads.dataset(paths, filesystem=self._fs, format="parquet")
            table = dataset.to_table(["sha256", "features"], filter=pc.field("sha256").isin(wanted))
        else:
            table = feature_schema(0).empty_table().select(["sha256", "features"])
        index = pc.index_in(wanted, value_set=table.column("sha256"))
        n_missing = index.null_count
        if n_missing:
            raise CacheMiss(
                f"{n_missing} of {len(wanted)} images have no features in the cache "
                f"{self.location}; run `emotr extract` with the same backbone and decode settings"
            )
        if table.num_rows == 0:
            return np.zeros((0, 0), np.float32)
        column = table.column("features").combine_chunks()
        matrix = column.flatten().to_numpy().reshape(len(column), column.type.list_size)
        return matrix[index.to_numpy()]

    def _table(self, keys, features, heights, widths) -> pa.Table:
        metadata = {
            _META_FINGERPRINT: self.fingerprint.encode(),
            _META_INPUTS: _canonical(self.inputs).encode(),
        }
        dim = features.shape[1]
        flat = pa.array(features.reshape(-1), pa.float32())
        columns = [
            pa.array(keys, pa.string()),
            pa.FixedSizeListArray.from_arrays(flat, dim),
            pa.array(heights, pa.int32()),
            pa.array(widths, pa.int32()),
        ]
        return pa.Table.from_arrays(columns, schema=feature_schema(dim, metadata))

    def _write_inputs_file(self) -> None:
        path = f"{self._dir}/{INPUTS_FILE}"
        if self._fs.get_file_info(path).type == pafs.FileType.File:
            return
        self._fs.create_dir(self._dir, recursive=True)
        text = json.dumps(self.inputs, indent=2, sort_keys=True) + "\n"
        self._put(path, lambda stream: stream.write(text.encode()))

    def _write_atomically(self, table: pa.Table, name: str) -> None:
        self._put(f"{self._dir}/{name}", lambda stream: pq.write_table(table, stream))

    def _put(self, final: str, write) -> None:
        if is_uri(self.location):  # one upload becomes visible whole, or not at all
            with self._fs.open_output_stream(final) as stream:
                write(stream)
            return
        temporary = f"{self._dir}/_tmp-{uuid.uuid4().hex}.parquet"
        with self._fs.open_output_stream(temporary) as stream:
            write(stream)
        self._fs.move(temporary, final)


def _is_part(name: str) -> bool:
    return name.startswith("part-") and name.endswith(".parquet")


def _list_files(filesystem: pafs.FileSystem, folder: str) -> list[pafs.FileInfo]:
    selector = pafs.FileSelector(folder, allow_not_found=True)
    infos = filesystem.get_file_info(selector)
    return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.base_name)


def _fingerprints(root: str) -> list[str]:
    filesystem, path = resolve(root)
    infos = filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def _read_inputs(root: str, fingerprint: str) -> dict[str, str]:
    filesystem, path = resolve(join(root, fingerprint, INPUTS_FILE))
    try:
        with filesystem.open_input_stream(path) as stream:
            return json.loads(stream.read())
    except FileNotFoundError:
        return {}


def list_caches(root: str) -> list[CacheInfo]:
    """One CacheInfo per fingerprint folder under `root` (row counts from Parquet footers)."""
    caches = []
    for fingerprint in _fingerprints(root):
        filesystem, folder = resolve(join(root, fingerprint))
        parts = [i for i in _list_files(filesystem, folder) if _is_part(i.base_name)]
        n_rows = sum(_num_rows(filesystem, i.path) for i in parts)
        inputs = _read_inputs(root, fingerprint)
        caches.append(
            CacheInfo(fingerprint, n_rows, sum(i.size for i in parts), len(parts), inputs)
        )
    return caches


def _num_rows(filesystem: pafs.FileSystem, path: str) -> int:
    try:
        return pq.ParquetFile(path, filesystem=filesystem).metadata.num_rows
    except (OSError, pa.ArrowException):
        return 0  # verify_cache reports it


def verify_cache(root: str, fingerprint: str | None = None) -> list[str]:
    """Problems found in one or every cache under `root`; an empty list means healthy."""
    problems = []
    for name in [fingerprint] if fingerprint else _fingerprints(root):
        problems += [f"{join(root, name)}: {text}" for text in _verify_one(root, name)]
    return problems


def _verify_one(root: str, fingerprint: str) -> list[str]:
    filesystem, folder = resolve(join(root, fingerprint))
    files = _list_files(filesystem, folder)
    problems = [
        f"{i.base_name} is a leftover of an interrupted commit; `emotr cache gc` deletes it"
        for i in files
        if i.base_name.startswith("_tmp-")
    ]
    inputs = _read_inputs(root, fingerprint)
    if not inputs:
        problems.append(f"{INPUTS_FILE} is missing or empty")
    elif fingerprint_of(inputs) != fingerprint:
        problems.append(f"{INPUTS_FILE} hashes to {fingerprint_of(inputs)}, not the folder name")
    seen: dict[str, str] = {}
    dims = set()
    for info in (i for i in files if _is_part(i.base_name)):
        try:
            table = pq.read_table(info.path, filesystem=filesystem)
        except (OSError, pa.ArrowException) as error:
            problems.append(
                f"{info.base_name} cannot be read ({error}); `emotr cache gc` removes it"
            )
            continue
        dim = _features_dim(table.schema)
        if not table.schema.equals(feature_schema(dim), check_metadata=False):
            schema = table.schema.to_string(show_schema_metadata=False)
            problems.append(f"{info.base_name}: schema {schema!r} != {feature_schema(dim)}")
            continue
        dims.add(dim)
        problems += [
            f"{info.base_name}: {text}" for text in _check_part(table, info.base_name, fingerprint)
        ]
        for key in table.column("sha256").to_pylist():
            if key in seen:
                problems.append(f"{key} is in both {seen[key]} and {info.base_name}")
            seen[key] = info.base_name
    if len(dims) > 1:
        problems.append(f"parts disagree on the feature dimension: {sorted(dims)}")
    return problems


def _features_dim(schema: pa.Schema) -> int:
    if "features" not in schema.names:
        return 0
    column_type = schema.field("features").type
    return column_type.list_size if pa.types.is_fixed_size_list(column_type) else 0


def _check_part(table: pa.Table, name: str, fingerprint: str) -> list[str]:
    problems = []
    meta = table.schema.metadata or {}
    if meta.get(_META_FINGERPRINT, b"").decode() != fingerprint:
        problems.append("file metadata names another fingerprint")
    keys = table.column("sha256").to_pylist()
    if len(set(keys)) != len(keys):
        problems.append("repeats a sha256 within the part")
    if name != part_name(keys):
        problems.append(f"name does not match its rows (expected {part_name(keys)})")
    values = table.column("features").combine_chunks().flatten().to_numpy()
    if not np.isfinite(values).all():
        problems.append(f"{int((~np.isfinite(values)).sum())} feature values are NaN or infinite")
    return problems


def gc_cache(root: str, fingerprint: str | None = None, *, min_age_s: float = 600.0) -> list[str]:
    """Delete `_tmp-*` leftovers older than min_age_s and unreadable parts; returns their paths."""
    removed = []
    for name in [fingerprint] if fingerprint else _fingerprints(root):
        filesystem, folder = resolve(join(root, name))
        for info in _list_files(filesystem, folder):
            if info.base_name.startswith("_tmp-"):
                age = time.time() - (info.mtime.timestamp() if info.mtime else 0.0)
                doomed = age >= min_age_s
            else:
                doomed = _is_part(info.base_name) and not _readable(filesystem, info.path)
            if doomed:
                filesystem.delete_file(info.path)
                removed.append(info.path)
    return removed


def _readable(filesystem: pafs.FileSystem, path: str) -> bool:
    try:
        pq.read_table(path, filesystem=filesystem)
    except (OSError, pa.ArrowException):
        return False
    return True


def export_npy(root: str, fingerprint: str, out_dir: str | Path) -> int:
    """Write features.npy (n, dim) and sha256.txt (one hash a line, same order); returns n."""
    cache = FeatureCache.open(root, fingerprint)
    keys = sorted(cache.cached_hashes())
    if not keys:
        raise FileNotFoundError(f"cache {cache.location} holds no features; run `emotr extract`")
    features = cache.load(keys)
    filesystem, folder = resolve(str(out_dir))
    filesystem.create_dir(folder, recursive=True)
    with filesystem.open_output_stream(f"{folder}/features.npy") as stream:
        np.save(stream, features)
    with filesystem.open_output_stream(f"{folder}/sha256.txt") as stream:
        stream.write("".join(f"{key}\n" for key in keys).encode())
    return len(keys)
