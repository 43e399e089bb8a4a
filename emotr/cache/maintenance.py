"""Inspect, repair and export feature caches: `emotr cache ls`, `verify`, `gc`, `compact`, `export`.

Deleting is the dangerous part: gc deletes a part only when all its bytes were read and they
are not a valid part (a storage error proves nothing), and compact publishes the rows it keeps
before it deletes anything.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from emotr.cache.activations import activation_schema, open_cache
from emotr.cache.fingerprint import fingerprint_of
from emotr.cache.store import (
    _META_FINGERPRINT,
    INPUTS_FILE,
    FeatureCache,
    feature_schema,
    is_part_name,
    list_files,
    list_fingerprints,
    locate,
    part_name,
    read_inputs,
)
from emotr.data.index import INDEX_FOLDER
from emotr.errors import EmotrError
from emotr.storage import join, resolve


@dataclass(frozen=True)
class CacheInfo:
    """One fingerprint's folder: distinct images, bytes and parts, and the inputs it hashes."""

    fingerprint: str
    n_rows: int
    n_bytes: int
    n_parts: int
    inputs: dict[str, str]

    @property
    def holds(self) -> str:
        """What its rows hold: a feature tap (gap5, gap4, ...), a tap's augmented view
        (gap5_view3) or an activation (block4_pool)."""
        holds = self.inputs.get("activation") or self.inputs.get("tap", "gap5")
        return f"{holds}_view{self.inputs['view']}" if "view" in self.inputs else holds


def list_caches(root: str) -> list[CacheInfo]:
    """One CacheInfo per fingerprint folder under `root`; n_rows counts distinct images."""
    caches = []
    for fingerprint in list_fingerprints(root):
        filesystem, folder = resolve(join(root, fingerprint))
        parts = [i for i in list_files(filesystem, folder) if is_part_name(i.base_name)]
        n_rows = len(set().union(*(_part_keys(filesystem, i.path) for i in parts)))
        inputs = read_inputs(root, fingerprint)
        caches.append(
            CacheInfo(fingerprint, n_rows, sum(i.size for i in parts), len(parts), inputs)
        )
    return caches


def _part_keys(filesystem: pafs.FileSystem, path: str) -> list[str]:
    try:
        table = pq.read_table(path, columns=["sha256"], filesystem=filesystem)
    except (OSError, pa.ArrowException):
        return []  # verify_cache reports it
    return table.column("sha256").to_pylist()


class _CorruptPart(Exception):
    """A part whose bytes were all read and do not hold a valid part."""


def _read_part(filesystem: pafs.FileSystem, info: pafs.FileInfo) -> pa.Table:
    """A valid part's rows; raises _CorruptPart only on bytes that were all read."""
    # An OSError while reading is the storage's (permissions, network, timeout), perhaps
    # passing: it proves nothing about the part, so it propagates as is.
    with filesystem.open_input_stream(info.path) as stream:
        data = stream.read()
    if info.size is not None and len(data) != info.size:
        # Short reads happen (a dropped connection, a part replaced meanwhile): not proof.
        raise OSError(f"read {len(data)} of the {info.size} bytes of {info.path}")
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (OSError, pa.ArrowException) as error:  # parsed from memory: the bytes are bad
        raise _CorruptPart(f"not a readable Parquet file ({error})") from error
    # The value column says what the part holds: features (float32) or an activation (bytes).
    activation = "activation" in table.schema.names
    expected = (
        activation_schema(_activation_bytes(table.schema))
        if activation
        else feature_schema(_features_dim(table.schema))
    )
    if not table.schema.equals(expected, check_metadata=False):
        schema = table.schema.to_string(show_schema_metadata=False)
        raise _CorruptPart(f"schema {schema!r} != {expected}")
    values = _activation_values(table) if activation else _feature_values(table)
    if not np.isfinite(values).all():
        n_bad = int((~np.isfinite(values)).sum())
        raise _CorruptPart(
            f"{n_bad} {'activation' if activation else 'feature'} values are NaN or infinite"
        )
    return table


def _feature_values(table: pa.Table) -> np.ndarray:
    return table.column("features").combine_chunks().flatten().to_numpy()


def _activation_values(table: pa.Table) -> np.ndarray:
    column = table.column("activation").combine_chunks()
    if len(column) == 0:
        return np.zeros(0, np.float32)
    data = np.frombuffer(column.buffers()[1], np.uint8)
    start, size = column.offset * column.type.byte_width, len(column) * column.type.byte_width
    return data[start : start + size].view(np.dtype(ml_dtypes.bfloat16)).astype(np.float32)


def _activation_bytes(schema: pa.Schema) -> int:
    column_type = schema.field("activation").type
    return column_type.byte_width if pa.types.is_fixed_size_binary(column_type) else 0


def verify_cache(
    root: str, fingerprint: str | None = None, *, filesystem: pafs.FileSystem | None = None
) -> list[str]:
    """Problems found in one or every cache under `root`; an empty list means healthy.

    Rows repeated across parts are reported as a warning: readers use one copy.
    `filesystem` replaces the one `root` names (e.g. one built with explicit credentials).
    """
    problems = []
    for name in [fingerprint] if fingerprint else list_fingerprints(root, filesystem):
        problems += [f"{join(root, name)}: {text}" for text in _verify_one(root, name, filesystem)]
    return problems


def _verify_one(root: str, fingerprint: str, filesystem: pafs.FileSystem | None) -> list[str]:
    inputs = read_inputs(root, fingerprint, filesystem)
    filesystem, folder = locate(join(root, fingerprint), filesystem)
    files = list_files(filesystem, folder)
    problems = [
        f"{i.base_name} is a leftover of an interrupted commit; `emotr cache gc` deletes it"
        for i in files
        if i.base_name.startswith("_tmp-")
    ]
    if not inputs:
        problems.append(f"{INPUTS_FILE} is missing or empty")
    elif fingerprint_of(inputs) != fingerprint:
        problems.append(f"{INPUTS_FILE} hashes to {fingerprint_of(inputs)}, not the folder name")
    first_part: dict[str, str] = {}
    repeats: dict[tuple[str, str], list[str]] = {}
    dims = set()
    for info in (i for i in files if is_part_name(i.base_name)):
        try:
            table = _read_part(filesystem, info)
        except _CorruptPart as error:
            problems.append(f"{info.base_name} is corrupt: {error}; `emotr cache gc` deletes it")
            continue
        except OSError as error:
            problems.append(f"{info.base_name} could not be read ({error}); try again")
            continue
        dims.add(_value_size(table.schema))
        problems += [
            f"{info.base_name}: {text}" for text in _check_part(table, info.base_name, fingerprint)
        ]
        for key in table.column("sha256").to_pylist():
            if first_part.setdefault(key, info.base_name) != info.base_name:
                repeats.setdefault((first_part[key], info.base_name), []).append(key)
    problems += [
        f"warning: {len(keys)} image(s) are in both {first} and {second} (e.g. {keys[0]}); "
        "readers use one copy, `emotr cache compact` merges them"
        for (first, second), keys in repeats.items()
    ]
    if len(dims) > 1:
        problems.append(f"parts disagree on the size of their values: {sorted(dims)}")
    return problems


def _value_size(schema: pa.Schema) -> int:
    """Features per row, or bytes per activation."""
    if "activation" in schema.names:
        return _activation_bytes(schema)
    return _features_dim(schema)


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
        problems.append("repeats a sha256 within the part; `emotr cache compact` merges them")
    if name != part_name(keys):
        problems.append(f"name does not match its rows (expected {part_name(keys)})")
    return problems


@dataclass(frozen=True)
class GcResult:
    """What `gc_cache` deleted, and the parts it kept because it could not read them now."""

    removed: list[str]
    skipped: list[tuple[str, str]]  # (path, why it was kept)


def gc_cache(
    root: str,
    fingerprint: str | None = None,
    *,
    min_age_s: float = 600.0,
    filesystem: pafs.FileSystem | None = None,
) -> GcResult:
    """Delete `_tmp-*` leftovers older than min_age_s and parts proven corrupt.

    Without `fingerprint`, listing indexes' leftovers (`_listings/_tmp-*`) go too.

    A part is deleted only when all its bytes were read and they are not a valid part; a part
    that cannot be read now (permissions, network, timeouts) is kept and listed as skipped.
    `filesystem` replaces the one `root` names (e.g. one built with explicit credentials).
    """
    removed, skipped = [], []
    names = [fingerprint] if fingerprint else [*list_fingerprints(root, filesystem), INDEX_FOLDER]
    for name in names:
        folder_fs, folder = locate(join(root, name), filesystem)
        for info in list_files(folder_fs, folder):
            try:
                doomed = _is_garbage(folder_fs, info, min_age_s)
            except OSError as error:
                skipped.append((info.path, f"could not be read ({error})"))
                continue
            if doomed:
                folder_fs.delete_file(info.path)
                removed.append(info.path)
    return GcResult(removed, skipped)


def _is_garbage(filesystem: pafs.FileSystem, info: pafs.FileInfo, min_age_s: float) -> bool:
    """True for an old `_tmp-*` leftover or a part proven corrupt."""
    if info.base_name.startswith("_tmp-"):
        return time.time() - (info.mtime.timestamp() if info.mtime else 0.0) >= min_age_s
    if not is_part_name(info.base_name):
        return False
    try:
        _read_part(filesystem, info)
    except _CorruptPart:
        return True
    return False


@dataclass(frozen=True)
class CompactResult:
    """What `compact_cache` did: repeated rows dropped, parts written, parts deleted."""

    n_dropped: int
    written: list[str]
    removed: list[str]


def compact_cache(root: str, fingerprint: str | None = None) -> CompactResult:
    """Rewrite parts so that every image has one row (after two drivers extracted at once).

    Crash-safe: each new part is published whole before any old part is deleted, so a crash
    leaves every row readable (at worst still repeated; run it again). Writers may run
    meanwhile (their new parts are not touched); a reader listing parts as they are deleted
    fails and can be re-run.
    """
    result = CompactResult(0, [], [])
    for name in [fingerprint] if fingerprint else list_fingerprints(root):
        one = _compact_one(open_cache(root, name))
        result = CompactResult(
            result.n_dropped + one.n_dropped,
            result.written + one.written,
            result.removed + one.removed,
        )
    return result


def _compact_one(cache: FeatureCache) -> CompactResult:
    plan = _plan_compaction(cache)
    existing = {_base_name(path) for path in cache.part_paths()}
    targets, written = set(), []
    for path, keep in plan.items():
        if not keep.any():
            continue
        table = pq.read_table(path, filesystem=cache.filesystem).filter(pa.array(keep))
        target = part_name(table.column("sha256").to_pylist())
        targets.add(target)
        if target not in existing:  # else a part holding exactly these rows is there already
            written.append(cache.publish_part(table))
    removed = []
    for path in plan:
        if _base_name(path) in targets:
            continue  # it holds exactly the rows kept from another part: keep it instead
        # Gone already: a concurrent compaction deleted it after publishing the same rows.
        with contextlib.suppress(FileNotFoundError):
            cache.filesystem.delete_file(path)
        removed.append(path)
    n_dropped = sum(int((~keep).sum()) for keep in plan.values())
    return CompactResult(n_dropped, written, removed)


def _base_name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _plan_compaction(cache: FeatureCache) -> dict[str, np.ndarray]:
    """For each part that repeats rows of an earlier part (or its own), the rows to keep."""
    seen: set[str] = set()
    plan = {}
    for path in cache.part_paths():
        try:
            table = pq.read_table(path, columns=["sha256"], filesystem=cache.filesystem)
        except (OSError, pa.ArrowException) as error:
            raise EmotrError(
                f"cannot compact {cache.location}: {path} cannot be read ({error}); "
                "`emotr cache verify` tells whether it is damaged, `emotr cache gc` deletes it"
            ) from error
        keys = table.column("sha256").to_pylist()
        keep = np.zeros(len(keys), dtype=bool)
        for index, key in enumerate(keys):
            keep[index] = key not in seen
            seen.add(key)
        if not keep.all():
            plan[path] = keep
    return plan


def export_npy(root: str, fingerprint: str, out_dir: str | Path) -> int:
    """Write features.npy (n, dim) and sha256.txt (one hash a line, same order); returns n."""
    cache = open_cache(root, fingerprint)
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
