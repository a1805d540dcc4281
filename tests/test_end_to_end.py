"""End-to-end requests from bench rows: static batches one after another, prefill + every step."""
import math

import pytest

from shadowkv_fx.bench import BenchRow
from shadowkv_fx.end_to_end import end_to_end, table


def test_whole_requests_count_every_batch_and_skip_rows_without_a_prefill():
    dense = BenchRow("dense-compiled", 122880, 2, steps=1024, tok_s=28.4, step_ms=70.0, prefill_s=20.4)
    skv = BenchRow("shadowkv", 122880, 12, steps=1024, tok_s=368.0, step_ms=32.6, prefill_s=130.0)
    random_fill = BenchRow("shadowkv", 122880, 16, steps=1024, tok_s=240.0, step_ms=66.0, fill="random")
    failed = BenchRow("dense-eager", 122880, 4, steps=1024, error="out of memory")
    lines = end_to_end([dense, skv, random_fill, failed], requests=13)
    assert [(e.method, e.batch) for e in lines] == [("dense-compiled", 2), ("shadowkv", 12)]
    d, s = lines
    assert d.batches == 7 and s.batches == 2  # a partly empty last batch costs a whole one
    assert d.total_s == pytest.approx(7 * (20.4 + 1024 * 0.070))
    assert s.tok_s == pytest.approx(13 * 1024 / (2 * (130.0 + 1024 * 0.0326)))
    assert s.prefill_s_per_seq == pytest.approx(130.0 / 12)
    text = table(lines)
    assert f"{s.tok_s / d.tok_s:.2f}x" in text and "1.00x" in text
    assert math.isclose(d.generated, 1024)
