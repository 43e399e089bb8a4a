"""Extraction's input blocks hold whole forward passes: no padded pass in the middle of a job."""

import pandas as pd

from emotr.config import ExtractConfig
from emotr.extract import _MAX_DECODE_BLOCKS, _rows_per_block, _split_rows


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
