"""Benchmark jobs leave the work tree clean unless asked to append to the docs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "jobs"))

import benchlib  # noqa: E402 - jobs/ is a folder of scripts, not a package


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    benchlib.add_output_arguments(parser)
    return parser.parse_args(list(argv))


def test_a_run_writes_its_results_folder_and_leaves_the_docs_alone(tmp_path: Path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n")
    assert parse().out == benchlib.BENCHMARKS_MD and not parse().docs

    result = benchlib.publish(
        parse("--results", str(tmp_path / "r"), "--out", str(docs)), "| a |\n"
    )
    assert result.parent == tmp_path / "r" and result.read_text() == "| a |\n"
    assert docs.read_text() == "# Benchmarks\n"

    benchlib.publish(
        parse("--results", str(tmp_path / "r"), "--out", str(docs), "--docs"), "| b |\n"
    )
    assert docs.read_text() == "# Benchmarks\n| b |\n"
