"""`emotr cache`: list, verify, clean up, compact and export the feature cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from emotr.cli.options import ConfigOption, Overrides, load_command_config
from emotr.cli.output import console, errors, fail, guard
from emotr.config_io import DEFAULT_CONFIG

# The cache room loads pandas and pyarrow (~0.5 s): each command imports what it runs, so that
# `emotr --help` answers at once.


def cache_ls(config: ConfigOption = DEFAULT_CONFIG, overrides: Overrides = None) -> None:
    """List fingerprints in the cache with their rows and bytes."""
    from emotr.cache.maintenance import list_caches

    cfg = load_command_config(config, overrides)
    table = Table("fingerprint", "holds", "rows", "parts", "MiB", "backbone", "weights", "input")
    for info in list_caches(cfg.cache.root):
        table.add_row(
            info.fingerprint,
            info.holds,
            str(info.n_rows),
            str(info.n_parts),
            f"{info.n_bytes / 2**20:.1f}",
            info.inputs.get("backbone", "?"),
            info.inputs.get("weights", "?")[:40],
            info.inputs.get("input_size", "?"),
        )
    console.print(table)


def cache_verify(config: ConfigOption = DEFAULT_CONFIG, overrides: Overrides = None) -> None:
    """Check schema, one row per hash, finite values and file integrity; exit 1 on problems.

    Warnings (rows repeated across parts, which readers de-duplicate) are printed but pass.
    """
    from emotr.cache.maintenance import verify_cache

    cfg = load_command_config(config, overrides)
    with guard(cfg):
        problems = verify_cache(cfg.cache.root)
    for problem in problems:
        errors.print(f"- {problem}", highlight=False)
    n_errors = sum(": warning: " not in problem for problem in problems)
    if n_errors:
        raise fail(f"{n_errors} problem(s) in cache {cfg.cache.root}")
    console.print(f"cache {cfg.cache.root}: ok ({len(problems)} warning(s))")


def cache_gc(config: ConfigOption = DEFAULT_CONFIG, overrides: Overrides = None) -> None:
    """Delete leftovers of interrupted commits (old _tmp files) and parts proven corrupt.

    A part that cannot be read now (permissions, network) is kept and listed.
    """
    from emotr.cache.maintenance import gc_cache

    cfg = load_command_config(config, overrides)
    with guard(cfg):
        result = gc_cache(cfg.cache.root)
    for path in result.removed:
        console.print(f"removed {path}", highlight=False)
    for path, reason in result.skipped:
        errors.print(f"kept {path}: {reason}", markup=False, highlight=False)
    kept = f", {len(result.skipped)} part(s) kept: run gc again later" if result.skipped else ""
    console.print(f"cache {cfg.cache.root}: {len(result.removed)} file(s) removed{kept}")


def cache_compact(config: ConfigOption = DEFAULT_CONFIG, overrides: Overrides = None) -> None:
    """Merge rows repeated across parts (left by two extractions at once) into one per image."""
    from emotr.cache.maintenance import compact_cache

    cfg = load_command_config(config, overrides)
    with guard(cfg):
        result = compact_cache(cfg.cache.root)
    for path in result.written:
        console.print(f"wrote {path}", highlight=False)
    for path in result.removed:
        console.print(f"removed {path}", highlight=False)
    console.print(
        f"cache {cfg.cache.root}: {result.n_dropped} repeated row(s) dropped, "
        f"{len(result.written)} part(s) written, {len(result.removed)} removed"
    )


def cache_export(
    out: Annotated[Path, typer.Argument(help="Folder for features.npy and sha256.txt.")],
    config: ConfigOption = DEFAULT_CONFIG,
    overrides: Overrides = None,
) -> None:
    """Export the current fingerprint's features as .npy for users who want plain numpy."""
    from emotr.cache.maintenance import export_npy
    from emotr.extract.fingerprint import compute_fingerprint

    cfg = load_command_config(config, overrides)
    fingerprint, _ = compute_fingerprint(cfg.backbone, cfg.decode)
    with guard(cfg):
        export_npy(cfg.cache.root, fingerprint, str(out))
    console.print(f"exported {fingerprint} to {out}")
