"""What this machine computes natively, for the settings that choose by it (backbone.precision:
auto). A leaf: it reads the CPU's flags and asks nvidia-smi, and imports nothing of emotr.

bfloat16 convolutions are worth it only where the hardware has them: on a CPU with AMX or
AVX-512 BF16 VGG16 ran 7.5x faster than in float32 (docs/benchmarks.md), on an H200 1.7x, while a
CPU without them emulates bfloat16 and runs slower than float32.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

# CPU flags (Linux /proc/cpuinfo) of native bfloat16 matrix arithmetic, and what they are called.
BFLOAT16_CPU_FLAGS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX-512 BF16"}
# NVIDIA GPUs compute bfloat16 natively from Ampere (compute capability 8.0) on.
MIN_BFLOAT16_CAPABILITY = (8, 0)
_NVIDIA_SMI_TIMEOUT_S = 10


def bfloat16_native(cpu_flags: set[str], gpu_capabilities: list[tuple[int, int]]) -> str | None:
    """Why bfloat16 is native here (a phrase), or None: with GPUs, the GPUs decide (extraction
    runs there); without, the CPU's flags."""
    if gpu_capabilities:
        oldest = min(gpu_capabilities)
        if oldest >= MIN_BFLOAT16_CAPABILITY:
            return f"NVIDIA GPU of compute capability {oldest[0]}.{oldest[1]}"
        return None
    native = [name for flag, name in BFLOAT16_CPU_FLAGS.items() if flag in cpu_flags]
    return f"CPU with {' and '.join(native)}" if native else None


@functools.cache
def machine_bfloat16() -> str | None:
    """bfloat16_native for this machine: its CPU flags and its NVIDIA GPUs (read once)."""
    return bfloat16_native(_cpu_flags(), _gpu_capabilities())


def resolve_precision(precision: str) -> str:
    """backbone.precision as it runs: auto -> bfloat16 where this machine computes it natively,
    float32 elsewhere; float32 and bfloat16 as they are."""
    if precision != "auto":
        return precision
    return "bfloat16" if machine_bfloat16() else "float32"


def run_precision(trained: str, native: str | None) -> str:
    """The precision a registered model's backbone runs at on a machine (`native`:
    machine_bfloat16's answer there): the one it was trained at, except a bfloat16 model where
    bfloat16 is not native, which runs in float32. Emulated bfloat16 was 3.4x slower there,
    and float32's features are within cosine 1e-5 of bfloat16's (docs/benchmarks.md)."""
    if trained == "bfloat16" and native is None:
        return "float32"
    return trained


def describe_precision(precision: str) -> str:
    """A phrase for `emotr doctor`: what bfloat16 costs or gains on this machine."""
    native = machine_bfloat16()
    if native:
        return f"{precision} (bfloat16 is native here: {native})"
    return f"{precision} (bfloat16 is not native here: float32 is the fast one)"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags to read, so no claim of native bfloat16
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def _gpu_capabilities() -> list[tuple[int, int]]:
    command = shutil.which("nvidia-smi")
    if command is None:
        return []
    try:
        result = subprocess.run(
            [command, "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=_NVIDIA_SMI_TIMEOUT_S,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):  # a driver that does not answer: no GPU to use
        return []
    capabilities = []
    for value in result.stdout.split():  # one "8.0" per GPU
        major, _, minor = value.partition(".")
        if major.isdigit() and minor.isdigit():
            capabilities.append((int(major), int(minor)))
    return capabilities
