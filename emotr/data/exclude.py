"""data.exclude: a CSV of files left out of every split (train, val, test); the data is not touched.

The CSV has a `path` column, a `sha256` column, or both (`emotr audit`'s label_issues.csv, reviewed
and cut down, is one). A row matches a listed image by its path or by its bytes: a sha256 leaves
out every copy of those bytes, a path only that file. Paths are matched as the listing writes
them (absolute local paths, or the URIs configured); relative ones are taken from data.root, or
from the manifest's folder for a manifest, as the manifest's own paths are.

The listing applies it after the split rule, so the files it leaves out move no other file's
split: a split is a keyed hash of each image's own bytes (or group), emotr.data.splits.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import pyarrow.fs as pafs

from emotr.config import DataConfig
from emotr.data.manifest import named
from emotr.errors import DataError
from emotr.storage import is_uri, join, resolve

log = logging.getLogger(__name__)

EXCLUDED_COLUMNS = ["path", "label", "class_name", "sha256", "split"]
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ExcludeList:
    """The paths (as the listing writes them) and sha256s that data.exclude names."""

    source: str
    paths: frozenset[str]  # every spelling of every path entry
    sha256s: frozenset[str]
    # Each path cell as written, with its spellings: for naming the ones that match nothing.
    path_entries: tuple[tuple[str, frozenset[str]], ...] = ()

    def digest(self) -> str:
        """A hash of what is left out, whatever the order or spelling of the CSV's rows."""
        text = "\n".join([*sorted(self.paths), "", *sorted(self.sha256s)])
        return hashlib.sha256(text.encode()).hexdigest()


def no_excluded() -> pd.DataFrame:
    """An empty table of excluded files (path, label, class_name, sha256, split)."""
    return pd.DataFrame({name: pd.Series(dtype=object) for name in EXCLUDED_COLUMNS})


def read_exclude(data: DataConfig) -> ExcludeList | None:
    """data.exclude read and checked; None when it is not set. Bad files are DataErrors."""
    if not data.exclude:
        return None
    table = _read_csv(data.exclude)
    columns = {str(name).strip().lower(): name for name in table.columns}
    if not {"path", "sha256"} & set(columns):
        raise DataError(
            f"data.exclude {data.exclude} has neither a 'path' nor a 'sha256' column (found "
            f"{list(table.columns)}): give one of them, or both, one file per row"
        )
    base = _relative_base(data)
    base = base if is_uri(base) else resolve(base)[1]
    entries = tuple(
        (entry, frozenset(_spellings(entry, base))) for entry in _cells(table, columns.get("path"))
    )
    paths = frozenset().union(*(spellings for _, spellings in entries))
    sha256s = {entry.lower() for entry in _cells(table, columns.get("sha256"))}
    bad = sorted(value for value in sha256s if not _SHA256.fullmatch(value))
    if bad:
        raise DataError(
            f"data.exclude {data.exclude}: {len(bad)} sha256 cell(s) are not 64 hex digits "
            f"({named(bad)}); write the file's sha256 as the audit's CSVs give it"
        )
    return ExcludeList(data.exclude, paths, frozenset(sha256s), entries)


def _read_csv(location: str) -> pd.DataFrame:
    filesystem, path = resolve(location)
    try:
        if filesystem.get_file_info(path).type != pafs.FileType.File:
            raise DataError(
                f"data.exclude {location} does not exist or is not a file: give a CSV with a "
                "'path' and/or 'sha256' column, or set data.exclude=null"
            )
        with filesystem.open_input_stream(path) as stream:
            content = io.BytesIO(stream.read())
        # All text, empty cells "": a row may name a file by one column only.
        return pd.read_csv(content, dtype=str, keep_default_na=False)
    except DataError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as error:  # pandas' ParserError included
        raise DataError(
            f"data.exclude {location} cannot be read as a CSV ({type(error).__name__}: {error}); "
            "it needs a 'path' and/or 'sha256' column, one file per row"
        ) from None


def _cells(table: pd.DataFrame, column: str | None) -> list[str]:
    if column is None:
        return []
    return [text for value in table[column].tolist() if (text := str(value).strip())]


def _relative_base(data: DataConfig) -> str:
    """What a relative path of the CSV is relative to: data.root, or the manifest's folder."""
    if data.manifest:
        return data.manifest.rstrip("/").rsplit("/", 1)[0] if "/" in data.manifest else "."
    return data.root


def _spellings(entry: str, base: str) -> set[str]:
    """The ways the listing may write the file `entry` names; `base` a URI or absolute path."""
    if is_uri(entry):
        return {entry}
    if entry.startswith("file://"):
        entry = entry.removeprefix("file://")
    local = os.path.expanduser(entry)
    if not os.path.isabs(local):
        if is_uri(base):
            return {join(base, entry)}
        local = os.path.join(base, local)
    # The listing resolves the root's symlinks but not the file's own: both spellings match.
    return {os.path.normpath(local), os.path.realpath(local)}


def apply_exclude(
    images: pd.DataFrame, data: DataConfig, classes: Sequence[str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the images data.exclude does not name, the ones it does) of split listing rows.

    A DataError when what is left has no train or val image of some class; a warning names
    the CSV's rows that match no listed image.
    """
    exclude = read_exclude(data)
    if exclude is None:
        return images, no_excluded()
    hit = images["path"].isin(exclude.paths) | images["sha256"].isin(exclude.sha256s)
    kept, excluded = images[~hit].reset_index(drop=True), images[hit].reset_index(drop=True)
    _warn_unmatched(exclude, images)
    _check_left(kept, classes, exclude.source)
    if len(excluded):
        log.info("data.exclude %s: %d file(s) left out", exclude.source, len(excluded))
    return kept, excluded[EXCLUDED_COLUMNS]


def _warn_unmatched(exclude: ExcludeList, images: pd.DataFrame) -> None:
    listed_paths, listed_hashes = set(images["path"]), set(images["sha256"])
    unmatched = [entry for entry, spellings in exclude.path_entries if not spellings & listed_paths]
    unmatched += sorted(exclude.sha256s - listed_hashes)
    if unmatched:
        log.warning(
            "data.exclude %s: %d entr(ies) match no listed image (%s); check the paths (relative "
            "ones are taken from data.root, or the manifest's folder)",
            exclude.source,
            len(unmatched),
            named(unmatched),
        )


def _check_left(kept: pd.DataFrame, classes: Sequence[str], source: str) -> None:
    for label, name in enumerate(classes):
        splits = set(kept.loc[kept["label"] == label, "split"].tolist())
        for wanted in ("train", "val"):
            if wanted not in splits:
                raise DataError(
                    f"data.exclude {source} leaves class {name!r} without a {wanted} image: "
                    "remove some of its rows from the CSV, or add images of that class"
                )
