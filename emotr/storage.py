"""Local paths and URIs (s3://, gs://, file://) to pyarrow filesystems, in one place."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from emotr.errors import EmotrError


def is_uri(location: str) -> bool:
    """True for scheme://... locations that are not plain local paths."""
    return "://" in location and not location.startswith("file://")


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding `location` and the path to use with it (local paths made absolute)."""
    if is_uri(location) or location.startswith("file://"):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())


def is_relative_path(location: str) -> bool:
    """True for a local path that depends on the working directory (no URI, not absolute)."""
    return "://" not in location and not Path(location).expanduser().is_absolute()


def absolute_path(location: str, key: str) -> Path:
    """A local path made absolute; `key` names the config key in the error a lost cwd raises."""
    try:
        return Path(location).expanduser().resolve()
    except FileNotFoundError:
        # resolve() (not strict) raises this only from os.getcwd(): the working directory is gone.
        raise EmotrError(
            f"{key}={location} is a relative path, and this process's working directory no longer "
            f"exists. {WORKING_DIR_GONE}"
        ) from None


# Why a job's working directory vanishes, and what to do about it (measured with Ray 2.60).
WORKING_DIR_GONE = (
    "Under `ray job submit` it is Ray's copy of --working-dir, which a second `ray start` node "
    "on the same host deletes when it shares the head's --temp-dir: start each node on one host "
    "with its own --temp-dir, and give store paths as URIs or absolute paths."
)


def read_bytes(location: str) -> bytes:
    """All bytes of one file, local or remote."""
    filesystem, path = resolve(location)
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or URI with forward slashes."""
    return "/".join([base.rstrip("/"), *(part.strip("/") for part in parts)])


def check_writable(location: str) -> None:
    """Create the folder `location` if needed, then write and delete a probe file in it.

    Raises the OSError of the first step that fails, so a bad store fails a job in a second
    instead of after its extraction.
    """
    filesystem, path = resolve(location)
    filesystem.create_dir(path, recursive=True)
    probe = f"{path}/.emotr-probe-{uuid.uuid4().hex}"
    with filesystem.open_output_stream(probe) as stream:
        stream.write(b"probe")
    filesystem.delete_file(probe)


def put_atomically(
    filesystem: pafs.FileSystem,
    final: str,
    write: Callable[[pa.NativeFile], object],
    *,
    remote: bool,
) -> None:
    """Write a file under a `_tmp-*` name beside `final` that readers ignore, then publish it whole.

    `remote`: an object store, where the temporary key is copied server-side to `final` (a rename
    there is a copy too, and not atomic); locally it is renamed.
    """
    folder, name = final.rsplit("/", 1)
    temporary = f"{folder}/_tmp-{uuid.uuid4().hex}-{name}"
    try:
        # On S3/GCS, closing the stream completes the upload even when `write` raised, so
        # a failed write must never go straight to the final key.
        with filesystem.open_output_stream(temporary) as stream:
            write(stream)
        if not remote:
            filesystem.move(temporary, final)  # a rename: atomic on local filesystems
            return
        filesystem.copy_file(temporary, final)  # server-side copy: the key appears whole
    except BaseException:
        _delete_leftover(filesystem, temporary)
        raise
    filesystem.delete_file(temporary)


def _delete_leftover(filesystem: pafs.FileSystem, path: str) -> None:
    # The error being raised matters more than this one; `emotr cache gc` deletes old leftovers.
    with contextlib.suppress(OSError):
        filesystem.delete_file(path)
