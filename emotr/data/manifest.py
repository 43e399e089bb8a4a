"""Read a data set's manifest (a CSV or Parquet of path, label) into readable image sources.

Paths may be absolute, relative to the manifest's folder, or URIs; labels are class names or
indexes. Two columns are optional: `split` (train, val or test, any case; an empty cell leaves the
file to the split rule) and `group` (any text: files of one group, e.g. one person's photos, share
a split; empty = no group). Every file is stat'ed here (one metadata call per filesystem; URIs in
parallel), so a missing image fails the listing with its path before any byte is read.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePosixPath
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow.fs as pafs

from emotr.errors import DataError
from emotr.storage import is_uri, join, resolve

MANIFEST_EXTENSIONS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
SPLITS = ("train", "val", "test")  # a manifest's given splits, in the order identical bytes keep
_MAX_NAMED = 10  # paths spelled out in one message; the rest are counted


class Source(NamedTuple):
    """How to read one image file, with what its metadata said."""

    location: str  # what users see: an absolute local path or a URI
    label: int
    filesystem: pafs.FileSystem | None  # None: resolve `location` in a worker thread
    fs_path: str
    size: int = -1  # bytes and modification time from the filesystem's metadata; -1 unknown
    mtime_ns: int = -1
    split: str | None = None  # the manifest's split for it: train, val or test; None: the rule's
    group: str | None = None  # files of one group share a split; None: the file is its own unit


def read_manifest(manifest: str, classes: Sequence[str]) -> list[Source]:
    """The manifest's images (path, label, split, group) with size and mtime; bad rows are
    DataErrors."""
    filesystem, fs_path = resolve(manifest)
    table = _read_checked_table(manifest, filesystem, fs_path)
    n_rows = len(table)
    splits = table["split"].tolist() if "split" in table.columns else [None] * n_rows
    groups = table["group"].tolist() if "group" in table.columns else [None] * n_rows
    columns = zip(table["path"], table["label"], splits, groups, strict=True)
    sources = []
    local = pafs.LocalFileSystem()  # one instance: _stat_sources asks it once for every file
    for row, (entry, value, split, group) in enumerate(columns, 1):
        if not isinstance(entry, str) or not entry.strip():
            raise DataError(f"manifest {manifest} row {row}: empty path; give every image a path")
        where = f"manifest {manifest} row {row} ({entry})"
        label = _label_index(value, classes, where)
        source = _manifest_source(entry.strip(), label, manifest, filesystem, fs_path, local)
        sources.append(source._replace(split=_given_split(split, where), group=_text(group)))
    return _stat_sources(sources)


def manifest_label_names(manifest: str) -> tuple[str, ...]:
    """The distinct label names of the manifest, sorted; a DataError if a label is an index."""
    filesystem, fs_path = resolve(manifest)
    labels = {_text(value) for value in _read_checked_table(manifest, filesystem, fs_path)["label"]}
    labels.discard(None)  # an empty label fails later, in read_manifest, naming its row
    indexes = sorted(label for label in labels if _as_index(label) is not None)
    if indexes:
        raise DataError(
            f"manifest {manifest} has index labels ({named(indexes)}), and data.classes is null, "
            "so the classes would be its label names: set data.classes to name the indexes "
            "(0 first), or write class names in the label column"
        )
    return tuple(sorted(labels))


def _read_checked_table(manifest: str, filesystem: pafs.FileSystem, fs_path: str) -> pd.DataFrame:
    table = _read_table(manifest, filesystem, fs_path)
    missing = {"path", "label"} - set(table.columns)
    if missing:
        raise DataError(
            f"manifest {manifest} lacks column(s) {sorted(missing)}: it needs 'path' and 'label' "
            f"(class name or index), found {list(table.columns)}"
        )
    return table


def _text(value: Any) -> str | None:
    """A cell as stripped text; None for an empty or missing one (CSV "", Parquet null or NaN)."""
    if value is None or (np.ndim(value) == 0 and pd.isna(value)):  # None, NaN, pd.NA, NaT
        return None
    if isinstance(value, float | np.floating) and float(value).is_integer():
        value = int(value)  # Parquet turns an int column with nulls into floats: 3.0 is "3"
    text = str(value).strip()
    return text or None


def _given_split(value: Any, where: str) -> str | None:
    text = _text(value)
    if text is None:
        return None
    if text.lower() not in SPLITS:
        raise DataError(
            f"{where}: unknown split {value!r}; use one of {list(SPLITS)} (any case), or leave "
            "the cell empty for the split rule to decide"
        )
    return text.lower()


def _read_table(manifest: str, filesystem: pafs.FileSystem, fs_path: str) -> pd.DataFrame:
    kind = MANIFEST_EXTENSIONS.get(PurePosixPath(fs_path).suffix.lower())
    if kind is None:
        raise DataError(
            f"manifest {manifest} must end with one of {sorted(MANIFEST_EXTENSIONS)}; "
            "check data.manifest"
        )
    if filesystem.get_file_info(fs_path).type != pafs.FileType.File:
        raise DataError(f"manifest {manifest} does not exist; check data.manifest")
    with filesystem.open_input_stream(fs_path) as stream:
        content = io.BytesIO(stream.read())
    if kind == "csv":
        # All text: "1" and "positive" in one column stay comparable, empty cells stay "".
        return pd.read_csv(content, dtype=str, keep_default_na=False)
    return pd.read_parquet(content)


def _manifest_source(
    entry: str,
    label: int,
    manifest: str,
    filesystem: pafs.FileSystem,
    fs_path: str,
    local_fs: pafs.LocalFileSystem,
) -> Source:
    if is_uri(entry):
        return Source(entry, label, None, entry)
    absolute = entry.startswith("file://") or os.path.isabs(os.path.expanduser(entry))
    if not absolute and is_uri(manifest):
        location = join(manifest.rsplit("/", 1)[0], entry)
        return Source(location, label, filesystem, join(fs_path.rsplit("/", 1)[0], entry))
    local = resolve(entry if absolute else os.path.join(os.path.dirname(fs_path), entry))[1]
    return Source(local, label, local_fs, local)


def _label_index(value: Any, classes: Sequence[str], where: str) -> int:
    number: Any = value
    if isinstance(value, str):
        text = value.strip()
        if text in classes:
            return list(classes).index(text)
        number = _as_index(text)
    elif isinstance(value, float | np.floating) and float(value).is_integer():
        number = int(value)
    is_int = isinstance(number, int | np.integer) and not isinstance(number, bool | np.bool_)
    if is_int and 0 <= number < len(classes):
        return int(number)
    raise DataError(
        f"{where}: unknown label {value!r}; use a class name from data.classes "
        f"{list(classes)} or an index 0..{len(classes) - 1}"
    )


def _as_index(text: str) -> int | None:
    return int(text) if text.lstrip("-").isdigit() else None


def _stat_sources(sources: Sequence[Source]) -> list[Source]:
    """The manifest's sources with size and mtime; a missing file is a DataError naming it."""
    infos: list[pafs.FileInfo | None] = [None] * len(sources)
    groups: dict[int, list[int]] = {}
    for index, src in enumerate(sources):
        if src.filesystem is not None:
            groups.setdefault(id(src.filesystem), []).append(index)
    for indexes in groups.values():  # one metadata call per filesystem
        filesystem = sources[indexes[0]].filesystem
        assert filesystem is not None
        paths = [sources[i].fs_path for i in indexes]
        for index, info in zip(indexes, filesystem.get_file_info(paths), strict=True):
            infos[index] = info
    remote = [i for i, src in enumerate(sources) if src.filesystem is None]
    # Manifest URIs are resolved in parallel: from_uri may ask the network (S3 region).
    with ThreadPoolExecutor() as pool:
        resolved = pool.map(_stat_uri, [sources[i].location for i in remote])
        for index, info in zip(remote, resolved, strict=True):
            infos[index] = info
    missing = [
        src.location
        for src, info in zip(sources, infos, strict=True)
        if info is None or info.type != pafs.FileType.File
    ]
    require_found(missing)
    return [
        src._replace(size=info.size, mtime_ns=info.mtime_ns if info.mtime_ns is not None else -1)
        for src, info in zip(sources, infos, strict=True)
        if info is not None
    ]


def _stat_uri(location: str) -> pafs.FileInfo:
    filesystem, path = resolve(location)
    return filesystem.get_file_info(path)


def require_found(missing: Sequence[str]) -> None:
    """A DataError naming the images that are not there, if any."""
    if missing:
        raise DataError(
            f"{len(missing)} image(s) not found or not a file: {named(missing)}; "
            "fix the paths (data.manifest) or restore the files"
        )


def named(items: Sequence[str]) -> str:
    """The first few items spelled out, the rest counted."""
    more = len(items) - _MAX_NAMED
    return ", ".join(items[:_MAX_NAMED]) + (f" and {more} more" if more > 0 else "")
