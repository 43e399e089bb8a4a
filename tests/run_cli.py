"""The `emotr` command as a user runs it: a real subprocess in the repository root."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Lines of Ray's that a healthy command keeps off its console (shown under --debug).
RAY_NOISE = re.compile(
    r"authentication token|Token authentication|Started a local Ray|Starting execution of "
    r"Dataset|Execution plan of Dataset|execution finished in|core_worker\.cc",
    re.IGNORECASE,
)


def emotr(
    *args: str, env: dict[str, str] | None = None, timeout: float = 600, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    """Run `python -m emotr.cli ARGS` in `cwd` and capture its exit code, stdout and stderr.

    env replaces the environment (None: this process's).
    """
    return subprocess.run(
        [sys.executable, "-m", "emotr.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def run_python(script: str, *args: str) -> subprocess.Popen:
    """Start `python -c SCRIPT ARGS` in the repository root as its own driver (no RAY_ADDRESS)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
