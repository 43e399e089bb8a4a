"""The class-folder walk (emotr.data.walk): what the filesystem holds, one listing per class
folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from emotr.data.walk import IMAGE_EXTENSIONS, class_folders, walk_root
from emotr.errors import DataError

CLASSES = ("negative", "positive")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def expected(root: Path) -> dict[tuple[str, int], tuple[int, int]]:
    """(path, label) -> (size, mtime_ns) of every image os.walk finds below the class folders,
    following symlinks, skipping hidden names and files that cannot be stat'ed (gone)."""
    found = {}
    for label, name in enumerate(CLASSES):
        for folder, dirs, files in os.walk(root / name, followlinks=True):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for file in files:
                path = Path(folder) / file
                if file.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS:
                    continue
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                found[(str(path), label)] = (stat.st_size, stat.st_mtime_ns)
    return found


def listed(root: Path) -> dict[tuple[str, int], tuple[int, int]]:
    table, _, _ = walk_root(str(root), CLASSES)
    rows = table.select(["location", "label", "size", "mtime_ns"]).to_pylist()
    assert len(rows) == len({(row["location"], row["label"]) for row in rows})  # each once
    return {(row["location"], row["label"]): (row["size"], row["mtime_ns"]) for row in rows}


def test_walk_gives_what_the_filesystem_holds_on_a_nested_tree(tmp_path):
    root = tmp_path / "data"
    for index in range(30):  # several depths, every extension in both cases, varied sizes
        ext = sorted(IMAGE_EXTENSIONS)[index % len(IMAGE_EXTENSIONS)]
        ext = ext.upper() if index % 3 == 0 else ext
        depth = "/".join(f"d{level}" for level in range(index % 4))
        write(root / CLASSES[index % 2] / depth / f"img{index}{ext}", "x" * index)
    write(root / "negative" / ".hidden.jpg", "hidden file")
    write(root / "negative" / ".thumbs" / "a.jpg", "in a hidden folder")
    write(root / "positive" / "notes.txt", "not an image")
    write(root / "positive" / "jpg", "a name without a dot")
    write(root / "other" / "b.jpg", "not a class folder")
    os.utime(write(root / "negative" / "old.png", "old"), ns=(10**18, 10**18))

    result = listed(root)

    assert result == expected(root)
    assert len(result) == 31
    assert result[(str(root / "negative" / "old.png"), 0)] == (3, 10**18)


def test_symlinks_are_followed_and_a_dangling_one_is_skipped(tmp_path):
    root, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    target = write(elsewhere / "shared" / "c.jpg", "outside the root")
    write(root / "negative" / "a.jpg", "a")
    write(root / "positive" / "b.jpg", "bb")
    (root / "negative" / "linked").symlink_to(elsewhere / "shared", target_is_directory=True)
    (root / "positive" / "alias.png").symlink_to(target)
    # What the walk sees of a file deleted between reading its folder and stat'ing it.
    (root / "positive" / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")

    result = listed(root)

    assert result == expected(root)
    size = len("outside the root")
    assert result[(str(root / "negative" / "linked" / "c.jpg"), 0)][0] == size
    assert result[(str(root / "positive" / "alias.png"), 1)][0] == size
    assert (str(root / "positive" / "gone.jpg"), 1) not in result


def test_the_first_class_in_error_is_named_whatever_the_threads_finish_first(tmp_path):
    (tmp_path / "data").mkdir()

    for _ in range(5):
        with pytest.raises(DataError, match=r"class folder .*/negative does not exist"):
            walk_root(str(tmp_path / "data"), CLASSES)


def test_file_uri_root_lists_absolute_paths(tmp_path):
    write(tmp_path / "negative" / "a.jpg", "a")
    write(tmp_path / "positive" / "b.jpg", "b")

    table, _, where = walk_root(f"file://{tmp_path}", CLASSES)

    assert sorted(table["location"].to_pylist()) == [
        str(tmp_path / "negative" / "a.jpg"),
        str(tmp_path / "positive" / "b.jpg"),
    ]
    assert where == [str(tmp_path / name) for name in CLASSES]


def test_class_folders_are_the_roots_subfolders_sorted_as_keras_sorts_them(tmp_path):
    for name in ("sad", "Happy", "angry", ".git", "_listings", "neutral/nested"):
        (tmp_path / name).mkdir(parents=True)
    write(tmp_path / "labels.csv", "a file is no class")
    (tmp_path / "linked").symlink_to(tmp_path / "sad", target_is_directory=True)

    assert class_folders(str(tmp_path)) == ("Happy", "angry", "linked", "neutral", "sad")
    assert class_folders(f"file://{tmp_path}") == class_folders(str(tmp_path))
    assert class_folders(str(tmp_path / "neutral")) == ("nested",)


def test_class_folders_of_a_missing_root_or_a_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(DataError, match=r"data root .*/nope does not exist.*data.classes null"):
        class_folders(str(tmp_path / "nope"))
    write(tmp_path / "file.jpg", "x")
    with pytest.raises(DataError, match=r"data root .*/file.jpg is not a folder"):
        class_folders(str(tmp_path / "file.jpg"))
