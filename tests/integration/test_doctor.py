"""`emotr doctor` and the checks every job runs first, as a user runs them: a real subprocess."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import SMOKE, store_overrides
from tests.run_cli import emotr

pytestmark = pytest.mark.slow


def test_a_submitted_job_refuses_relative_store_paths_before_any_work(tmp_path: Path):
    # RAY_ADDRESS is how `ray job submit` tells its driver which cluster it belongs to.
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}
    result = emotr("run", "-c", str(SMOKE), cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 1
    message = result.stderr.replace("\n", " ")
    assert "paths" in message and "cache.root=.emotr/cache" in message
    assert "ray job submit" in message and "fix: give each an s3://" in message
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # no store created where the job would lose it


def stores(tmp_path: Path) -> list[str]:
    return [f"data.root={tmp_path / 'data'}", *store_overrides(tmp_path)]


def check_lines(output: str) -> dict[str, str]:
    """The doctor's lines by check name: '✓ cache ...' -> {'cache': '✓ cache ...'}."""
    return {line.split()[1]: line for line in output.splitlines() if line[:1] in "✓✗"}


def test_doctor_is_all_green_on_a_working_local_setup(tmp_path: Path):
    result = emotr("doctor", "-c", str(SMOKE), *stores(tmp_path), cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = check_lines(result.stdout)
    names = ["paths", "weights", "data", "cache", "tracking", "artifacts", "optuna", "ray"]
    assert list(lines) == names
    assert all(line.startswith("✓") for line in lines.values())
    assert "1 node(s), 2 CPUs" in lines["ray"] and "tensorflow import" in lines["ray"]
    assert "all 8 checks passed" in result.stdout
    assert "database tables" not in result.stdout + result.stderr  # a new store, created quietly
    assert not (tmp_path / "cache" / ".emotr-probe").exists()


def test_doctor_prints_each_red_line_with_its_fix_and_no_password(tmp_path: Path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    args = [
        *stores(tmp_path),
        f"cache.root={blocker / 'cache'}",
        f"backbone.weights={tmp_path / 'missing.weights.h5'}",
        "tune.storage=postgresql://optuna:Sup3r-s3cret@127.0.0.1:9/optuna",
        "ray.address=127.0.0.1:9",
    ]
    result = emotr("doctor", "-c", str(SMOKE), *args, cwd=tmp_path, timeout=300)
    assert result.returncode == 1
    lines = check_lines(result.stdout)
    red = {name for name, line in lines.items() if line.startswith("✗")}
    assert red == {"weights", "cache", "optuna", "ray"}
    assert all("; fix: " in lines[name] for name in red)
    assert "missing.weights.h5" in lines["weights"]
    assert str(blocker) in lines["cache"]
    assert "postgresql://optuna:***@127.0.0.1:9/optuna" in lines["optuna"]
    assert "Connection refused" in lines["optuna"] and "PGPASSWORD" in lines["optuna"]
    assert "nothing answers on 127.0.0.1:9" in lines["ray"]
    assert "Sup3r-s3cret" not in result.stdout + result.stderr
    assert "4 of 8 checks failed" in result.stderr
