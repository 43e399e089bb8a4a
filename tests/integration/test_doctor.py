"""`emotr doctor` and the checks every job runs first, as a user runs them: a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SMOKE

pytestmark = pytest.mark.slow


def emotr(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "emotr.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_a_submitted_job_refuses_relative_store_paths_before_any_work(tmp_path: Path):
    # RAY_ADDRESS is how `ray job submit` tells its driver which cluster it belongs to.
    result = emotr("run", "-c", str(SMOKE), cwd=tmp_path, env={"RAY_ADDRESS": "127.0.0.1:9"})
    assert result.returncode == 1
    message = result.stderr.replace("\n", " ")
    assert "paths" in message and "cache.root=.emotr/cache" in message
    assert "ray job submit" in message and "fix: give each an s3://" in message
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # no store created where the job would lose it
