"""Find the images (class folders or a manifest), hash their bytes and split them train/val.

Finding reads metadata only (name, size, mtime): `list_files`. Hashes come from the listing index
(emotr.data.index), from the extraction's workers, or from `hash_files` here; `complete_listing`
then drops label conflicts and splits. Each image's split is decided by a keyed hash of its content,
so it is the same on every machine, does not depend on listing order and does not move when
other images are added or removed.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from emotr.config import DataConfig
from emotr.data.manifest import Source, named, read_manifest, require_found
from emotr.data.walk import IMAGE_EXTENSIONS as IMAGE_EXTENSIONS  # where predict and tests find it
from emotr.data.walk import walk_root
from emotr.errors import DataError
from emotr.storage import resolve

log = logging.getLogger(__name__)

_CHUNK_BYTES = 1 << 20
CONFLICT = "conflict"  # the split the listing index records for a file left out as a conflict


# eq=False: generated __eq__/__hash__ would compare DataFrames, which pandas refuses.
@dataclass(frozen=True, eq=False)
class Listing:
    """The usable images with content hashes and split, the label conflicts, and a digest.

    Both frames have path, label, class_name, sha256 (object: Python strings) and images a split.
    """

    images: pd.DataFrame
    conflicts: pd.DataFrame
    digest: str

    def train(self) -> pd.DataFrame:
        """The rows of the train split."""
        return self.images[self.images["split"] == "train"].reset_index(drop=True)

    def val(self) -> pd.DataFrame:
        """The rows of the val split."""
        return self.images[self.images["split"] == "val"].reset_index(drop=True)


@dataclass(frozen=True, eq=False)
class FileList:
    """Every image file of the data set with its label, size and mtime; no byte read yet."""

    files: pd.DataFrame  # path, label, class_name, size, mtime_ns; sorted by path, label
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


def list_images(cfg: DataConfig) -> Listing:
    """All images of the data set with sha256 of their bytes and a deterministic train/val split."""
    found = list_files(cfg)
    return complete_listing(cfg, found, hash_files(found.sources()))


def list_files(cfg: DataConfig) -> FileList:
    """The data set's image files (class folders or manifest) from metadata alone."""
    if cfg.manifest:
        table, filesystems, where = _manifest_files(cfg)
    else:
        table, filesystem, folders = walk_root(cfg.root, cfg.classes)
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
            "class_name": pa.array(cfg.classes, pa.string()).take(table["label"]),
            "size": table["size"],
            "mtime_ns": table["mtime_ns"],
        }
    ).to_pandas()
    _check_enough_files(files, cfg.classes, where)
    return FileList(files, where, filesystems[order.to_numpy()], table["fs_path"])


def _manifest_files(cfg: DataConfig) -> tuple[pa.Table, np.ndarray, dict[int, str]]:
    """The manifest's rows as the walk gives them, each row's filesystem, where for each label."""
    sources = read_manifest(cfg.manifest, cfg.classes)
    table = pa.table(
        {
            name: pa.array([getattr(source, name) for source in sources], kind)
            for name, kind in (
                ("location", pa.string()),
                ("fs_path", pa.string()),
                ("label", pa.int64()),
                ("size", pa.int64()),
                ("mtime_ns", pa.int64()),
            )
        }
    )
    filesystems = np.empty(len(sources), dtype=object)
    filesystems[:] = [source.filesystem for source in sources]
    return table, filesystems, dict.fromkeys(range(len(cfg.classes)), f"manifest {cfg.manifest}")


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
    frame = _with_hashes(found, sha256s)
    images, conflicts = _drop_conflicts(frame)
    _check_splittable(images, cfg.classes, found.where)
    images["split"] = assign_split(
        images["sha256"].tolist(), images["label"].tolist(), cfg.val_fraction, cfg.seed
    )
    return Listing(images=images, conflicts=conflicts, digest=_digest(images))


def listing_from_splits(
    found: FileList, sha256s: Sequence[str], splits: np.ndarray, digest: str
) -> Listing:
    """The Listing of `found` whose split ("train", "val" or "conflict") each file has already.

    What complete_listing would give for the same files, hashes and split rule, without its
    per-image work: the listing index keeps the splits of the last listing (emotr.data.index).
    """
    frame = _with_hashes(found, sha256s)
    conflict = splits == CONFLICT
    images = frame[~conflict].reset_index(drop=True)
    images["split"] = splits[~conflict]
    conflicts = frame[conflict].reset_index(drop=True)
    if len(conflicts):
        _warn_conflicts(conflicts)
    return Listing(images=images, conflicts=conflicts, digest=digest)


def _with_hashes(found: FileList, sha256s: Sequence[str]) -> pd.DataFrame:
    frame = found.files[["path", "label", "class_name"]].copy()
    # Python strings (object), not pandas' Arrow-backed str: hashes are looked up in sets
    # (`isin(cached)`, `set(...)`), which took 0.45 s per 100,000 Arrow strings, 0.07 s as objects.
    frame["sha256"] = pd.Series(np.asarray(sha256s, dtype=object), frame.index, dtype=object)
    return frame


def assign_split(
    sha256s: Sequence[str], labels: Sequence[int], val_fraction: float, seed: int
) -> np.ndarray:
    """The split ("train" or "val") of each image, decided by a keyed hash of its content.

    An image is val iff ``int(sha256(f"{seed}:{sha256}")[:16], 16) / 2**64 < val_fraction``, so
    each class gets about ``val_fraction`` of its images in val, identical bytes share a split, and
    adding images never moves existing ones. The only non-local decision is the tiny-set rule: a
    class with no val image gets the image with the smallest keyed hash moved to val, and one with
    no train image gets the largest moved to train. Only while that rule fires can added images
    of the same class move the one image it picked.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(sha256s) != len(labels):
        raise ValueError(f"got {len(sha256s)} hashes but {len(labels)} labels; pass one per image")
    hashes = np.asarray(sha256s, dtype=object)
    label_array = np.asarray(labels)
    scores = np.array([_split_score(digest, seed) for digest in hashes], dtype=np.float64)
    is_val = scores < val_fraction
    for label in np.unique(label_array):
        in_class = label_array == label
        if len(set(hashes[in_class])) < 2:
            raise DataError(
                f"label {label} has fewer than 2 distinct images: a train and a val split need "
                "one each; add images to that class"
            )
        if not is_val[in_class].any():
            picked = hashes[in_class][np.argmin(scores[in_class])]
            is_val[in_class & (hashes == picked)] = True
        elif is_val[in_class].all():
            picked = hashes[in_class][np.argmax(scores[in_class])]
            is_val[in_class & (hashes == picked)] = False
    return np.where(is_val, "val", "train")


def _split_score(sha256: str, seed: int) -> float:
    # The first 8 bytes of the digest, big-endian: int(hexdigest()[:16], 16) without the text.
    keyed = hashlib.sha256(f"{seed}:{sha256}".encode()).digest()
    return int.from_bytes(keyed[:8], "big") / 2**64


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
