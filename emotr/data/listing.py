"""Find the images (class folders or a manifest), hash their bytes, split them train/val/test.

The classes come first: `resolve_classes` names them from the root's folders (or the manifest's
labels) when data.classes is null. Finding reads metadata only (name, size, mtime): `list_files`.
Hashes come from the listing index (emotr.data.index), from the extraction's workers, or from
`hash_files` here; `complete_listing` then drops label conflicts, splits, and keeps bytes found in
two splits out of the later one. Each image's split is decided by a keyed hash of its content (or
of its manifest group), so it is the same on every machine, does not depend on listing order and
does not move when other images are added or removed; a manifest's given split wins. Last, the
files data.exclude names leave every split (emotr.data.exclude): no other file moves.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from emotr.config import DataConfig
from emotr.data.exclude import apply_exclude, no_excluded
from emotr.data.manifest import (
    Source,
    manifest_label_names,
    named,
    read_manifest,
    require_found,
)
from emotr.data.splits import assign_split as assign_split  # where callers and tests find it
from emotr.data.splits import drop_cross_split, no_cross_split, warn_missing_test
from emotr.data.walk import IMAGE_EXTENSIONS as IMAGE_EXTENSIONS  # where predict and tests find it
from emotr.data.walk import class_folders, walk_root
from emotr.errors import DataError
from emotr.storage import resolve

log = logging.getLogger(__name__)

_CHUNK_BYTES = 1 << 20
CONFLICT = "conflict"  # the split the listing index records for a file left out as a conflict
_COLUMNS = ["path", "label", "class_name", "sha256"]
IMAGE_COLUMNS = [*_COLUMNS, "split", "group"]


# eq=False: generated __eq__/__hash__ would compare DataFrames, which pandas refuses.
@dataclass(frozen=True, eq=False)
class Listing:
    """The usable images with content hashes and split, the label conflicts, and a digest.

    The frames have path, label, class_name, sha256 (object: Python strings); images also a split
    (train, val or test) and a group (the manifest's; None where absent); cross_split every copy
    of bytes found in two splits, with its split and whether it was kept (the earliest split's);
    excluded the files data.exclude left out, with the split the rule gave them.
    """

    images: pd.DataFrame
    conflicts: pd.DataFrame
    digest: str
    cross_split: pd.DataFrame = field(default_factory=no_cross_split)
    excluded: pd.DataFrame = field(default_factory=no_excluded)

    def train(self) -> pd.DataFrame:
        """The rows of the train split."""
        return self._rows("train")

    def val(self) -> pd.DataFrame:
        """The rows of the val split."""
        return self._rows("val")

    def test(self) -> pd.DataFrame:
        """The rows of the test split (the search never reads them)."""
        return self._rows("test")

    def _rows(self, split: str) -> pd.DataFrame:
        return self.images[self.images["split"] == split].reset_index(drop=True)


@dataclass(frozen=True, eq=False)
class FileList:
    """Every image file of the data set with its label, size and mtime; no byte read yet."""

    # path, label, class_name, size, mtime_ns, given_split and group (object, None where the
    # manifest gives none; folders: all None); sorted by path, label
    files: pd.DataFrame
    where: dict[int, str]  # label -> where its images were found, for error messages
    # How to read each row, in the same order: its filesystem (None: resolve `path` in a worker
    # thread) and the path on it. Arrays, not a Source per file: a listing of 100,000 files
    # builds readers only for the few it must read.
    filesystems: np.ndarray
    fs_paths: pa.ChunkedArray

    def sources(self) -> list[Source]:
        """How to read each file, in the order of `files`."""
        files = self.files
        columns = (
            files["path"].tolist(),
            files["label"].tolist(),
            self.filesystems,
            self.fs_paths.to_pylist(),
            files["size"].tolist(),
            files["mtime_ns"].tolist(),
            files["given_split"].tolist(),
            files["group"].tolist(),
        )
        return [Source(*row) for row in zip(*columns, strict=True)]

    def subset(self, mask: np.ndarray) -> FileList:
        """The files where `mask` is true, in the same order."""
        return FileList(
            self.files[mask].reset_index(drop=True),
            self.where,
            self.filesystems[mask],
            self.fs_paths.filter(pa.array(mask, pa.bool_())),
        )


def resolve_classes(data: DataConfig) -> DataConfig:
    """`data` with classes named: as given, else the root's class folders (or the manifest's label
    names), sorted; a DataError when that finds fewer than two."""
    if data.classes is not None:
        return data
    if data.manifest:
        names = manifest_label_names(data.manifest)
        found = f"manifest {data.manifest} has {len(names)} label name(s)"
        fix = "label images of two or more classes"
    else:
        names = class_folders(data.root)
        found = f"data.root {data.root} has {len(names)} class folder(s)"
        fix = "add folders, one per class (hidden ones, starting with '.' or '_', are skipped)"
    if len(names) < 2:
        shown = ", ".join(names) or "none"
        raise DataError(f"{found} ({shown}) and data.classes is null: set data.classes or {fix}")
    return data.model_copy(update={"classes": names})


def require_classes(data: DataConfig) -> tuple[str, ...]:
    """data.classes; a ValueError when it is still null (a caller skipped resolve_classes)."""
    if data.classes is None:
        raise ValueError(
            "data.classes is None: call emotr.data.listing.resolve_classes(data) first, which "
            "names the classes from data.root's folders or the manifest's labels"
        )
    return data.classes


def list_images(cfg: DataConfig) -> Listing:
    """All images of the data set with sha256 of their bytes and a deterministic split."""
    found = list_files(cfg)
    return complete_listing(cfg, found, hash_files(found.sources()))


def list_files(cfg: DataConfig) -> FileList:
    """The data set's image files (class folders or manifest) from metadata alone."""
    classes = require_classes(cfg)
    if cfg.manifest:
        table, filesystems, where = _manifest_files(cfg.manifest, classes)
    else:
        table, filesystem, folders = walk_root(cfg.root, classes)
        filesystems = np.full(table.num_rows, filesystem, dtype=object)
        where = dict(enumerate(folders))
    # Arrow sorts and converts 100,000 rows in milliseconds; pandas' str columns wrap the same
    # Arrow buffers, so to_pandas copies no string.
    order = pc.sort_indices(table, [("location", "ascending"), ("label", "ascending")])
    table = table.take(order)
    files = pa.table(
        {
            "path": table["location"],
            "label": table["label"],
            "class_name": pa.array(classes, pa.string()).take(table["label"]),
            "size": table["size"],
            "mtime_ns": table["mtime_ns"],
        }
    ).to_pandas()
    for name in ("given_split", "group"):
        column = table[name] if name in table.column_names else None
        # dtype=object: pandas would make text with gaps its str dtype, with NaN for None.
        files[name] = pd.Series(_objects(column, len(files)), files.index, dtype=object)
    _check_enough_files(files, classes, where)
    return FileList(files, where, filesystems[order.to_numpy()], table["fs_path"])


def _objects(column: pa.ChunkedArray | None, n_rows: int) -> np.ndarray:
    # Python strings and None, as in a Listing; a folder listing has none: no per-row work.
    if column is None or column.null_count == len(column):
        return np.full(n_rows, None, dtype=object)
    return np.asarray(column.to_pylist(), dtype=object)


def _manifest_files(
    manifest: str, classes: Sequence[str]
) -> tuple[pa.Table, np.ndarray, dict[int, str]]:
    """The manifest's rows as the walk gives them, each row's filesystem, where for each label."""
    sources = read_manifest(manifest, classes)
    table = pa.table(
        {
            column: pa.array([getattr(source, name) for source in sources], kind)
            for column, name, kind in (
                ("location", "location", pa.string()),
                ("fs_path", "fs_path", pa.string()),
                ("label", "label", pa.int64()),
                ("size", "size", pa.int64()),
                ("mtime_ns", "mtime_ns", pa.int64()),
                ("given_split", "split", pa.string()),
                ("group", "group", pa.string()),
            )
        }
    )
    filesystems = np.empty(len(sources), dtype=object)
    filesystems[:] = [source.filesystem for source in sources]
    return table, filesystems, dict.fromkeys(range(len(classes)), f"manifest {manifest}")


def _check_enough_files(files: pd.DataFrame, classes: Sequence[str], where: dict[int, str]) -> None:
    # Before any byte is read: hashes may come only after an extraction, this check at once.
    n_distinct = files.groupby("label")["path"].nunique()
    for label, name in enumerate(classes):
        n_files = int(n_distinct.get(label, 0))
        if n_files < 2:
            raise DataError(
                f"class {name!r} has {n_files} distinct image(s) in {where[label]}; train and "
                "val need one each: add images"
            )


def complete_listing(cfg: DataConfig, found: FileList, sha256s: Sequence[str]) -> Listing:
    """The Listing of `found` given each file's sha256 (in its order): conflicts out, split."""
    classes = require_classes(cfg)
    frame = _with_hashes(found, sha256s)
    images, conflicts = _drop_conflicts(frame)
    _check_splittable(images, classes, found.where)
    given = images["given_split"].to_numpy()
    images["split"] = assign_split(
        _units(images),
        images["label"].tolist(),
        cfg.val_fraction,
        cfg.seed,
        cfg.test_fraction,
        given if pd.notna(given).any() else None,
    )
    return _finish(images, conflicts, None, cfg)


def listing_from_splits(
    found: FileList,
    sha256s: Sequence[str],
    splits: np.ndarray,
    digest: str,
    data: DataConfig | None = None,
) -> Listing:
    """The Listing of `found` whose split ("train", "val", "test" or "conflict") each file has.

    What complete_listing would give for the same files, hashes and split rule, without its
    per-image work: the listing index keeps the splits of the last listing (emotr.data.index).
    A file dropped as a copy of bytes in an earlier split has the split the rule gave it.
    `data`: the config it was split under, for the warning naming classes missing from test.
    """
    frame = _with_hashes(found, sha256s)
    conflict = splits == CONFLICT
    images = frame[~conflict].reset_index(drop=True)
    images["split"] = splits[~conflict]
    conflicts = frame[conflict].reset_index(drop=True)
    if len(conflicts):
        _warn_conflicts(conflicts)
    return _finish(images, conflicts, digest, data)


def _finish(
    images: pd.DataFrame, conflicts: pd.DataFrame, digest: str | None, data: DataConfig | None
) -> Listing:
    """The Listing of split images: copies of bytes in an earlier split out, then the files
    data.exclude names (after the split: leaving them out moves no other file), then the digest."""
    images, cross_split = drop_cross_split(images)
    excluded = no_excluded()
    if data is not None:
        images, excluded = apply_exclude(images, data, require_classes(data))
    if data is not None and data.test_fraction > 0:
        warn_missing_test(images, require_classes(data))
    return Listing(
        images=images[IMAGE_COLUMNS],
        conflicts=conflicts[_COLUMNS],
        digest=digest if digest is not None else _digest(images),
        cross_split=cross_split,
        excluded=excluded,
    )


def _with_hashes(found: FileList, sha256s: Sequence[str]) -> pd.DataFrame:
    frame = found.files[[*_COLUMNS[:3], "given_split", "group"]].copy()
    # Python strings (object), not pandas' Arrow-backed str: hashes are looked up in sets
    # (`isin(cached)`, `set(...)`), which took 0.45 s per 100,000 Arrow strings, 0.07 s as objects.
    frame["sha256"] = pd.Series(np.asarray(sha256s, dtype=object), frame.index, dtype=object)
    return frame


def _units(images: pd.DataFrame) -> list[str]:
    """What each image's split is decided by: its manifest group, else its bytes."""
    groups = images["group"].to_numpy()
    return np.where(pd.notna(groups), groups, images["sha256"].to_numpy()).tolist()


def hash_files(sources: Sequence[Source]) -> list[str]:
    """The sha256 of each source's bytes, read here (threads); a missing file is a DataError."""
    # hashlib releases the GIL on large buffers and reads wait on I/O, so threads overlap both.
    with ThreadPoolExecutor() as pool:
        digests = list(pool.map(_hash_source, sources))
    require_found(
        [src.location for src, digest in zip(sources, digests, strict=True) if not digest]
    )
    return [digest for digest in digests if digest]


def _hash_source(source: Source) -> str | None:
    # Manifest URIs are resolved here, in parallel: from_uri may ask the network (S3 region).
    filesystem, path = source.filesystem, source.fs_path
    if filesystem is None:
        filesystem, path = resolve(source.location)
    digest = hashlib.sha256()
    try:
        with filesystem.open_input_stream(path) as stream:
            while chunk := stream.read(_CHUNK_BYTES):
                digest.update(chunk)
    except OSError:
        if filesystem.get_file_info(path).type != pafs.FileType.File:
            return None
        raise
    return digest.hexdigest()


def _drop_conflicts(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    n_labels = frame.groupby("sha256")["label"].transform("nunique")
    clash = (n_labels > 1).to_numpy()
    conflicts = frame[clash].reset_index(drop=True)
    if len(conflicts):
        _warn_conflicts(conflicts)
    return frame[~clash].reset_index(drop=True), conflicts


def _warn_conflicts(conflicts: pd.DataFrame) -> None:
    # A log line, not warnings.warn: the user needs the files named, not listing.py's source line.
    shown = [f"{row.path} ({row.class_name})" for row in conflicts.itertuples()]
    log.warning(
        "%d image(s) have identical bytes under more than one label and were left out: %s; delete "
        "the wrong copies or fix the labels (every path is in data/conflicts.csv of the run)",
        conflicts["sha256"].nunique(),
        named(shown),
    )


def _check_splittable(images: pd.DataFrame, classes: Sequence[str], where: dict[int, str]) -> None:
    for label, name in enumerate(classes):
        n_distinct = images.loc[images["label"] == label, "sha256"].nunique()
        if n_distinct < 2:
            raise DataError(
                f"class {name!r} has {n_distinct} distinct image(s) in {where[label]} (bytes also "
                "under another label left out); train and val need one each: add images"
            )


def _digest(images: pd.DataFrame) -> str:
    rows = sorted(zip(images["sha256"], images["label"].astype(int), images["split"], strict=True))
    text = "\n".join(f"{sha256},{label},{split}" for sha256, label, split in rows)
    return hashlib.sha256(text.encode()).hexdigest()
