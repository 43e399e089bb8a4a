"""The `emotr` command as a user runs it: a real subprocess in the repository root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def emotr(
    *args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run `python -m emotr.cli ARGS` and capture its exit code, stdout and stderr."""
    return subprocess.run(
        [sys.executable, "-m", "emotr.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
