"""emotr as a wheel installs it (`pip install .`, the Docker image): no checkout, no conf/ near.

The wheel is built offline from a copy of the sources (the checkout stays clean while other tests
run in it) and installed into a bare folder; the installed `emotr` runs from a directory outside
the checkout, with the virtualenv's site-packages for its dependencies only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.run_cli import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The folder the built wheel was installed into with `pip install --target`."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # what the build reads: pyproject.toml, README.md, the package
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "emotr", source / "emotr", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist")]
    _check(subprocess.run([*build, str(source)], capture_output=True, text=True, timeout=300))
    [wheel] = (root / "dist").glob("emotr-*.whl")
    target = root / "target"
    install = [*pip, "install", "--no-deps", "--target", str(target), str(wheel)]
    _check(subprocess.run(install, capture_output=True, text=True, timeout=300))
    return target


def _check(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _installed_python(target: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Python with the wheel's emotr alone: -S skips site-packages' .pth files (the venv's
    editable emotr), PYTHONPATH is the install folder then the dependencies, cwd elsewhere."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]])
    env["COLUMNS"] = "300"  # --help on one line per option: the default's path whole
    return subprocess.run(
        [sys.executable, "-S", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_wheel_ships_the_default_config_and_runs_without_a_checkout(installed, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    packaged = installed / "emotr" / "default.yaml"
    assert packaged.read_bytes() == (REPO / "conf" / "default.yaml").read_bytes()

    check = """
import emotr, sys
from emotr.config import Config
from emotr.config_io import DEFAULT_CONFIG, load_config
assert emotr.__file__.startswith(sys.argv[1]), emotr.__file__  # not the checkout's emotr
assert str(DEFAULT_CONFIG).startswith(sys.argv[1]), DEFAULT_CONFIG
assert load_config([DEFAULT_CONFIG]) == Config()
print("loaded", DEFAULT_CONFIG)
"""
    loaded = _installed_python(installed, "-c", check, str(installed), cwd=elsewhere)
    assert loaded.returncode == 0, loaded.stderr
    assert f"loaded {packaged}" in loaded.stdout

    helped = _installed_python(installed, "-m", "emotr.cli", "run", "--help", cwd=elsewhere)
    assert helped.returncode == 0, helped.stderr
    assert "Usage" in helped.stdout and "[section.key=value]..." in helped.stdout
    assert f"[default: {packaged}]" in helped.stdout

    # A command without -c: the packaged defaults, loaded and used (an empty cache listed).
    listed = _installed_python(installed, "-m", "emotr.cli", "cache", "ls", cwd=elsewhere)
    assert listed.returncode == 0, listed.stderr
    assert "fingerprint" in listed.stdout
    assert not list(elsewhere.iterdir())  # listing an absent cache wrote nothing
