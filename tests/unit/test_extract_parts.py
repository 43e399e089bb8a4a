"""Parts of the extraction pipeline that need no Ray: input blocks, the actor's environment."""

import os

import pandas as pd
import pytest

from emotr.config import ExtractConfig
from emotr.extract.dataset import _MAX_DECODE_BLOCKS, _rows_per_block, _split_rows
from emotr.extract.runtime import initialise_devices, use_environment


def rows(n: int) -> pd.DataFrame:
    return pd.DataFrame({"path": [f"/data/{i}.jpg" for i in range(n)], "sha256": ""})


def test_163_images_make_five_full_passes_and_one_short_one():
    cfg = ExtractConfig(batch_size=32, decode_batch_size=16)
    blocks = _split_rows(rows(163), _rows_per_block(cfg, 163))
    assert [len(block) for block in blocks] == [32, 32, 32, 32, 32, 3]
    assert pd.concat(blocks)["path"].tolist() == rows(163)["path"].tolist()


def test_a_larger_decode_batch_rounds_up_to_whole_passes():
    assert _rows_per_block(ExtractConfig(batch_size=32, decode_batch_size=100), 1000) == 128
    assert _rows_per_block(ExtractConfig(batch_size=128, decode_batch_size=16), 1000) == 128


def test_a_huge_job_keeps_the_block_count_bounded_and_whole():
    cfg = ExtractConfig(batch_size=32, decode_batch_size=16)
    n = _MAX_DECODE_BLOCKS * 32 * 3 + 1
    step = _rows_per_block(cfg, n)
    assert step % 32 == 0 and -(-n // step) <= _MAX_DECODE_BLOCKS


def test_an_actor_process_already_running_another_keras_backend_is_refused(monkeypatch):
    keras = pytest.importorskip("keras")
    other = "jax" if keras.backend.backend() != "jax" else "tensorflow"
    # Set first, so that monkeypatch restores both variables after the test.
    monkeypatch.setenv("EMOTR_TEST_MARK", "0")
    monkeypatch.setenv("KERAS_BACKEND", keras.backend.backend())
    with pytest.raises(RuntimeError, match=f"not extract.keras_backend={other}"):
        use_environment({"KERAS_BACKEND": other, "EMOTR_TEST_MARK": "1"}, "node")
    assert os.environ["EMOTR_TEST_MARK"] == "0"  # nothing set when refused
    use_environment({"KERAS_BACKEND": keras.backend.backend(), "EMOTR_TEST_MARK": "1"}, "node")
    assert os.environ["EMOTR_TEST_MARK"] == "1"


def test_the_backend_device_runtime_starts_and_names_the_devices_it_sees():
    keras = pytest.importorskip("keras")
    devices = initialise_devices(keras.backend.backend())
    # On a machine without GPUs (as CI) every backend names its CPU device.
    assert devices and any("cpu" in name.lower() for name in devices), devices
