"""What every benchmark job shares: where its markdown section goes.

A run writes its section to a results folder (ignored by git), so benchmarking leaves the work tree
clean; `--docs` also appends it to docs/benchmarks.md, for a measurement worth keeping.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = REPO / "docs" / "benchmarks.md"
RESULTS_DIR = REPO / ".emotr" / "bench"


def machine_description() -> str:
    """The machine a section's numbers come from: its processor and CPU count."""
    return f"{processor_name()}, {os.cpu_count()} CPUs"


def processor_name() -> str:
    """The processor's model (Linux names it in /proc/cpuinfo; Python only says x86_64): the
    same job runs at other speeds on this workplace's Xeon and AMD EPYC machines."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def command_line() -> str:
    """The command that ran this job, as a reader would type it again."""
    return shlex.join(["python", f"jobs/{Path(sys.argv[0]).name}", *sys.argv[1:]])


def section_heading(title: str) -> str:
    """A dated section's heading and its first words: the command and the machine it ran on."""
    today = time.strftime("%Y-%m-%d")
    return f"\n### {title}, {today}\n\n`{command_line()}` on {machine_description()}"


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """--results DIR (default .emotr/bench), --docs (append to docs/benchmarks.md too), --out."""
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder for results")
    parser.add_argument("--docs", action="store_true", help="also append to --out")
    parser.add_argument("--out", type=Path, default=BENCHMARKS_MD, help="the docs file --docs uses")


def publish(args: argparse.Namespace, section: str) -> Path:
    """Print the section, write it to the results folder and, with --docs, append it to --out."""
    print(section)
    job = Path(sys.argv[0]).stem or "bench"
    args.results.mkdir(parents=True, exist_ok=True)
    result = args.results / f"{job}-{time.strftime('%Y%m%d-%H%M%S')}.md"
    result.write_text(section)
    print(f"results: {result}")
    if args.docs:
        with args.out.open("a") as file:
            file.write(section)
    return result
