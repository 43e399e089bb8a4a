"""What every benchmark job shares: where its markdown section goes."""

from __future__ import annotations

import argparse
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """--out FILE (default docs/benchmarks.md) and --no-write."""
    parser.add_argument("--out", type=Path, default=BENCHMARKS_MD)
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs alone")


def publish(args: argparse.Namespace, section: str) -> None:
    """Print the section and, unless --no-write, append it to --out."""
    print(section)
    if not args.no_write:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as file:
            file.write(section)
