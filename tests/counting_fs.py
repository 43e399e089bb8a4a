"""A pyarrow filesystem over the real local one that logs every file opened for reading.

`install(log)` makes emotr resolve local paths to it in this process (and, as a Ray
worker_process_setup_hook, in every worker), so a test counts the image reads of real runs:
one line per open in `log`, from any process.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs as pafs


class LocalPassThrough(pafs.FileSystemHandler):
    """A pyarrow filesystem handler that sends every call to the real LocalFileSystem.

    Tests subclass it to watch or break what they need (opens for reading), on real files.
    """

    def __init__(self):
        self.local = pafs.LocalFileSystem()

    def open_input_stream(self, path):
        return self.local.open_input_stream(path)

    def open_input_file(self, path):
        return self.local.open_input_file(path)

    def get_type_name(self):
        return type(self).__name__

    def equals(self, other):
        return other is self

    def normalize_path(self, path):
        return self.local.normalize_path(path)

    def get_file_info(self, paths):
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.local.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.local.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.local.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("refusing to empty the root folder")

    def delete_file(self, path):
        self.local.delete_file(path)

    def move(self, src, dest):
        self.local.move(src, dest)

    def copy_file(self, src, dest):
        self.local.copy_file(src, dest)

    def open_output_stream(self, path, metadata):
        return self.local.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.local.open_append_stream(path, metadata=metadata)


class CountingHandler(LocalPassThrough):
    """The local filesystem; every open for reading is appended to `log`."""

    def __init__(self, log: str):
        super().__init__()
        self.log = log

    def _record(self, path: str) -> None:
        # O_APPEND writes of one short line do not interleave across processes.
        with open(self.log, "a") as file:
            file.write(f"{path}\n")

    def open_input_stream(self, path):
        self._record(path)
        return self.local.open_input_stream(path)

    def open_input_file(self, path):
        self._record(path)
        return self.local.open_input_file(path)

    def equals(self, other):
        return isinstance(other, CountingHandler) and other.log == self.log


def install(log: str) -> None:
    """Make emotr's modules resolve local paths to the counting filesystem in this process."""
    from emotr import storage

    original = getattr(storage.resolve, "original", storage.resolve)

    def resolve(location: str) -> tuple[pafs.FileSystem, str]:
        filesystem, path = original(location)
        if isinstance(filesystem, pafs.LocalFileSystem):
            filesystem = pafs.PyFileSystem(CountingHandler(log))
        return filesystem, path

    resolve.original = original  # type: ignore[attr-defined]
    for module in modules_resolving():
        module.resolve = resolve  # type: ignore[attr-defined]


def modules_resolving() -> list:
    """The emotr modules that open files through their own name `resolve` (storage.resolve)."""
    import importlib

    names = ["storage", "data.listing", "data.index", "data.walk", "cache.store"]
    return [importlib.import_module(f"emotr.{name}") for name in names]


def opened(log: str | Path, under: str | Path) -> list[str]:
    """The paths under `under` opened for reading, in order, as often as they were opened."""
    if not os.path.exists(log):
        return []
    prefix = str(under).rstrip("/") + "/"
    return [line for line in Path(log).read_text().splitlines() if line.startswith(prefix)]
