"""The listing index: each data file's (size, mtime) and sha256, kept beside the feature cache.

A file whose size and mtime match its index row takes its sha256 from the index without being
read. New or changed files are hashed where their bytes are read anyway: by the extraction's
workers (emotr.extract.driver), or here on the driver for commands that extract nothing (tune).

The index of a data root (or manifest) is one Parquet file,
`<cache.root>/_listings/<digest of the root's URI>.parquet`: emotr never writes into a data root.
It is published whole (a `_tmp-*` name, then a rename or a server-side copy, as cache parts are),
so a reader never sees half of one; an index that cannot be read is ignored (files are hashed
again), never trusted in part.

The key is (size, mtime): pyarrow's FileInfo carries no ETag. Where mtimes are coarse (S3's
LastModified and some filesystems: whole seconds), a rewrite that keeps the size within the same
second as the indexed write is not seen: the file keeps its old hash, and features, until its
size or mtime changes again (were it extracted, its task would find the bytes changed).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from emotr.config import DataConfig
from emotr.data.exclude import read_exclude
from emotr.data.listing import (
    CONFLICT,
    DataError,
    FileList,
    Listing,
    complete_listing,
    hash_files,
    list_files,
    listing_from_splits,
    require_classes,
)
from emotr.storage import is_uri, join, put_atomically, resolve

log = logging.getLogger(__name__)

INDEX_FOLDER = "_listings"
INDEX_SCHEMA = pa.schema(
    [
        pa.field("location", pa.string(), nullable=False),
        pa.field("size", pa.int64(), nullable=False),
        pa.field("mtime_ns", pa.int64(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
    ]
)
_COLUMNS = INDEX_SCHEMA.names
# With the hashes, the index keeps the last listing's label and split of each file, under the
# split rule (classes, val and test fractions, seed; a manifest's split and group columns) and
# digest it had: a warm run over unchanged files takes them instead of splitting 100,000 images
# again. Indexes without them still read. A copy left out for bytes in an earlier split keeps
# the split the rule gave it: the warm listing finds it again, as the cold one did.
SPLIT_COLUMNS = {"label": pa.int64(), "split": pa.string()}
_SPLIT_SCHEMA = pa.schema([*INDEX_SCHEMA, *(pa.field(n, t) for n, t in SPLIT_COLUMNS.items())])
_META_RULE, _META_DIGEST = b"emotr.split_rule", b"emotr.listing_digest"


@dataclass(frozen=True, eq=False)
class StoredSplits:
    """The label and split of each indexed file, and the digest, under `rule`."""

    rule: str
    digest: str
    labels: np.ndarray  # int64, one per index row, in its order
    splits: np.ndarray  # "train", "val", "test" or CONFLICT (object), likewise


def split_rule(data: DataConfig, files: pd.DataFrame | None = None) -> str:
    """What a file's split depends on besides its bytes: classes, val and test fractions, seed,
    and for a manifest a hash of its path, split and group columns (`files`: FileList.files);
    with data.exclude, a hash of what it leaves out (the stored digest is of the rest)."""
    rule = [list(require_classes(data)), data.val_fraction, data.test_fraction, data.seed]
    if data.manifest and files is not None:
        rule.append(_manifest_columns_digest(files))
    exclude = read_exclude(data)
    if exclude is not None:
        rule.append({"exclude": exclude.digest()})
    return json.dumps(rule)


def _manifest_columns_digest(files: pd.DataFrame) -> str:
    # A changed split or group cell re-splits. One JSON list per column: 30 ms for 100,000 rows,
    # a quarter of a formatted line per row; None and "" stay apart, as do tabs in names.
    digest = hashlib.sha256()
    for name in ("path", "given_split", "group"):
        digest.update(json.dumps(files[name].tolist()).encode())
    return digest.hexdigest()


def index_location(cache_root: str, data: DataConfig) -> str:
    """Where the index of `data`'s root (or manifest) lives under `cache_root`."""
    source = data.manifest or data.root
    # One name for one place: "./x", "x/" and "file:///abs/x" are the same local folder.
    canonical = source.rstrip("/") if is_uri(source) else resolve(source)[1]
    kind = "manifest" if data.manifest else "root"
    digest = hashlib.sha256(f"{kind}:{canonical}".encode()).hexdigest()[:16]
    return join(cache_root, INDEX_FOLDER, f"{digest}.parquet")


def read_index(location: str) -> pd.DataFrame:
    """The index at `location` (location, size, mtime_ns, sha256); empty when there is none."""
    return read_index_with_splits(location)[0]


def read_index_with_splits(location: str) -> tuple[pd.DataFrame, StoredSplits | None]:
    """The index at `location` and the splits stored with it (None: none, or not usable)."""
    table = _read_index_table(location)
    return table.select(_COLUMNS).to_pandas(), _stored_splits(table)


def _read_index_table(location: str) -> pa.Table:
    """The index with its stored split columns and metadata, each location once; empty if none."""
    filesystem, path = resolve(location)
    try:
        table = pq.read_table(path, filesystem=filesystem)
        schema = _SPLIT_SCHEMA if set(SPLIT_COLUMNS) <= set(table.column_names) else INDEX_SCHEMA
        index = table.select(schema.names).cast(schema)
    except FileNotFoundError:
        return INDEX_SCHEMA.empty_table()
    except (OSError, pa.ArrowInvalid, KeyError) as error:
        # Published whole, an index can only be unreadable through outside damage: hashing the
        # files again is slow but right, trusting part of one is not.
        log.warning(
            "listing index %s cannot be read (%s); hashing the files again", location, error
        )
        return INDEX_SCHEMA.empty_table()
    if _has_duplicates(index["location"]):  # several writers' rows: the last one counts
        keep = ~index["location"].to_pandas().duplicated(keep="last").to_numpy()
        return index.select(_COLUMNS).filter(pa.array(keep))  # the splits were of other rows
    return index.replace_schema_metadata(table.schema.metadata)


def _has_duplicates(locations: pa.ChunkedArray) -> bool:
    # emotr writes the index in listing order, sorted by location: strictly increasing means
    # each location once, checked in C; pandas' duplicated() took 0.13 s on 100,000 rows.
    if len(locations) < 2 or pc.all(pc.less(locations[:-1], locations[1:])).as_py():
        return False
    return bool(locations.to_pandas().duplicated().any())


def _stored_splits(table: pa.Table) -> StoredSplits | None:
    meta = table.schema.metadata or {}
    if not (set(SPLIT_COLUMNS) <= set(table.column_names) and _META_RULE in meta):
        return None
    return StoredSplits(
        meta[_META_RULE].decode(),
        meta[_META_DIGEST].decode(),
        table["label"].to_numpy(),
        table["split"].to_numpy(zero_copy_only=False),
    )


def write_index(
    location: str, index: pd.DataFrame, listing: Listing | None = None, rule: str = ""
) -> None:
    """Publish `index` at `location` atomically (readers see the old index or the new one).

    With `listing` (of exactly these files, each path once), each file's label and split and
    the listing's digest are stored too, under the split rule `rule`.
    """
    filesystem, path = resolve(location)
    table = pa.Table.from_pandas(index[_COLUMNS], schema=INDEX_SCHEMA, preserve_index=False)
    if listing is not None:
        table = _with_splits(table, index, listing, rule)
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    put_atomically(
        filesystem, path, lambda stream: pq.write_table(table, stream), remote=is_uri(location)
    )


def _with_splits(table: pa.Table, index: pd.DataFrame, listing: Listing, rule: str) -> pa.Table:
    images, conflicts, dropped = listing.images, listing.conflicts, listing.cross_split
    dropped = dropped[~dropped["kept"].astype(bool)]
    columns = ["path", "label", "split"]
    # Excluded files keep the split the rule gave them: data.exclude is applied on every listing.
    kept = [images[columns], dropped[columns]]
    if len(listing.excluded):
        kept.append(listing.excluded[columns])
    by_path = pd.concat([*kept, conflicts[columns[:2]].assign(split=CONFLICT)]).set_index("path")
    rows = by_path.loc[index["location"].to_numpy()]
    for name, kind in SPLIT_COLUMNS.items():
        table = table.append_column(pa.field(name, kind), pa.array(rows[name].to_numpy(), kind))
    meta = {_META_RULE: rule.encode(), _META_DIGEST: listing.digest.encode()}
    return table.replace_schema_metadata(meta)


@dataclass(frozen=True, eq=False)
class Scan:
    """The data set's files with the hashes the index knows; `complete` makes the Listing."""

    data: DataConfig
    found: FileList
    sha256: pd.Series  # object, aligned with found.files; "" where the file must be read to know
    index: str | None  # where the index is kept; None: nowhere
    index_is_current: bool  # the index holds exactly these files with these hashes
    # The index's splits, when it holds exactly these files and labels under today's rule.
    stored: StoredSplits | None = None

    def unknown(self) -> pd.DataFrame:
        """Files (path, once each) whose sha256 is not known without reading them."""
        files = self.found.files[self.sha256.to_numpy() == ""]
        return files[["path"]].drop_duplicates().reset_index(drop=True)

    def known(self) -> pd.DataFrame:
        """Files (path, sha256) whose hash the index gave."""
        known = self.sha256.to_numpy() != ""
        frame = self.found.files.loc[known, ["path"]].reset_index(drop=True)
        # Python strings, as in a Listing: the extraction looks them up in the cache's set.
        frame["sha256"] = pd.Series(self.sha256[known].to_numpy(), dtype=object)
        return frame

    def complete(self, learned: Mapping[str, str]) -> Listing:
        """The Listing, given the hashes of unknown files by path; updates the index.

        A file with no hash known or learned (unreadable: the extraction reported it) is left
        out. A data set the listing's checks refuse still gets its index written: it does not
        lose the hashes that cost a read of every file.
        """
        if self.stored is not None:  # nothing changed since the index was written
            stored = self.stored
            return listing_from_splits(
                self.found, self.sha256, stored.splits, stored.digest, self.data
            )
        hashes = self.sha256.where(self.sha256 != "", self.found.files["path"].map(learned))
        hashes = hashes.fillna("")
        keep = (hashes != "").to_numpy()
        found = self.found.subset(keep)
        try:
            listing = complete_listing(self.data, found, hashes[keep].tolist())
        except DataError:
            self._update_index(found, hashes[keep], None, stale=not self.index_is_current)
            raise
        stale = not (self.index_is_current and keep.all())
        self._update_index(found, hashes[keep], listing, stale)
        return listing

    def _update_index(
        self, found: FileList, hashes: pd.Series, listing: Listing | None, stale: bool
    ) -> None:
        # Splits are stored when each path is listed once (a manifest may name one twice).
        storable = listing is not None and not found.files["path"].duplicated().any()
        if self.index is None or not (stale or storable):
            return
        frame = found.files[["path", "size", "mtime_ns"]].rename(columns={"path": "location"})
        frame = frame.assign(sha256=hashes.to_numpy()).drop_duplicates("location")
        rule = split_rule(self.data, found.files)
        write_index(self.index, frame, listing if storable else None, rule)

    def complete_here(self) -> Listing:
        """The Listing, hashing unknown files in this process (commands that extract nothing)."""
        unknown = self.sha256.to_numpy() == ""
        sources = self.found.subset(unknown).sources()
        learned = dict(zip((src.location for src in sources), hash_files(sources), strict=True))
        return self.complete(learned)


def scan_images(data: DataConfig, cache_root: str | None) -> Scan:
    """List the data set from metadata; sha256 from the index under `cache_root` where unchanged.

    `cache_root` None keeps no index: every file is unknown.
    """
    found = list_files(data)
    location = index_location(cache_root, data) if cache_root is not None else None
    index = _read_index_table(location) if location is not None else INDEX_SCHEMA.empty_table()
    if _same_files(found.files, index):  # the common warm case: no join, no pandas index
        sha256 = pd.Series(index["sha256"].to_numpy(zero_copy_only=False), dtype=object)
        stored = _stored_splits(index)
        usable = (
            stored is not None
            and stored.rule == split_rule(data, found.files)
            and np.array_equal(stored.labels, found.files["label"].to_numpy())
        )
        return Scan(data, found, sha256, location, True, stored if usable else None)
    files = found.files[["path", "size", "mtime_ns"]].rename(columns={"path": "location"})
    matched = files.merge(index.select(_COLUMNS).to_pandas(), on=_COLUMNS[:3], how="left")
    sha256 = pd.Series(matched["sha256"].fillna("").to_numpy(), dtype=object)
    current = index.num_rows == files["location"].nunique() and (sha256 != "").all()
    return Scan(data, found, sha256, location, bool(current))


def _same_files(files: pd.DataFrame, index: pa.Table) -> bool:
    """Whether the index lists exactly these files, in this order, with this size and mtime."""
    if len(files) != index.num_rows:
        return False
    if not all(
        np.array_equal(files[column].to_numpy(), index[column].to_numpy())
        for column in ("size", "mtime_ns")  # the cheap comparisons first
    ):
        return False
    # Compared in Arrow: pandas' str column wraps an Arrow array (large_string) already.
    paths = pa.chunked_array([pa.array(files["path"], pa.large_string())])
    return paths.equals(index["location"].cast(pa.large_string()))


def list_images_indexed(data: DataConfig, cache_root: str | None) -> Listing:
    """The Listing with every hash, reading only the files the index does not know."""
    return scan_images(data, cache_root).complete_here()
