"""backbone.precision: auto, decided once where the config is validated, by the hardware."""

from __future__ import annotations

import pytest

from emotr.config import BackboneConfig
from emotr.config_io import load_config
from emotr.extract.fingerprint import compute_fingerprint
from emotr.hardware import bfloat16_native, machine_bfloat16, resolve_precision

AMX = {"fpu", "avx2", "avx512f", "amx_tile", "amx_bf16"}


@pytest.mark.parametrize(
    ("cpu_flags", "gpus", "native"),
    [
        ({"fpu", "avx2", "avx512f"}, [], None),  # AVX-512 without BF16: emulated, slower
        ({"fpu", "avx512_bf16"}, [], "CPU with AVX-512 BF16"),
        (AMX, [], "CPU with AMX-BF16"),
        (AMX, [(7, 5)], None),  # a T4 runs the extraction: its bfloat16 is emulated
        ({"avx2"}, [(9, 0), (8, 0)], "NVIDIA GPU of compute capability 8.0"),
        ({"avx2"}, [(9, 0), (7, 0)], None),  # the oldest GPU decides: actors land on any
    ],
)
def test_native_bfloat16_is_the_gpus_where_there_are_some_else_the_cpus(cpu_flags, gpus, native):
    assert bfloat16_native(cpu_flags, gpus) == native


def test_auto_resolves_to_what_this_machine_has_and_explicit_values_stay():
    here = "bfloat16" if machine_bfloat16() else "float32"
    assert resolve_precision("auto") == here
    assert load_config([], []).backbone.precision == here
    assert BackboneConfig().precision == here
    for explicit in ("float32", "bfloat16"):
        assert load_config([], [f"backbone.precision={explicit}"]).backbone.precision == explicit


def test_the_cache_fingerprint_names_the_precision_that_ran_never_auto():
    auto = load_config([], ["backbone.weights=none"])
    here = resolve_precision("auto")
    explicit = load_config([], ["backbone.weights=none", f"backbone.precision={here}"])
    fingerprint, inputs = compute_fingerprint(auto.backbone, auto.decode)
    assert inputs["precision"] == here
    assert fingerprint == compute_fingerprint(explicit.backbone, explicit.decode)[0]
