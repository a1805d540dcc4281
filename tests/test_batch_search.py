"""``bench --batches best``: the search finds the fastest batch of a one-peak curve and says what bounds it."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shadowkv_fx import batch_search


@dataclass
class FakeRow:
    batch: int
    tok_s: float | None
    v_on_gpu: float | None = 1.0
    v_hit_rate: float | None = 0.7
    error: str | None = None
    breakdown: list = field(default_factory=list)


def one_peak(peak: int, fall: float):
    """tokens/s rising linearly to ``peak``, then each extra sequence costs ``fall`` of a step (at 122K on
    the H100, bf16: batch 16 ran at 0.65x batch 12's tokens/s, a fall of ~0.35)."""
    def measure(batch: int) -> FakeRow:
        spill = max(0, batch - peak)
        return FakeRow(batch, 100.0 * batch / (1 + fall * spill), v_on_gpu=1.0 if spill == 0 else 0.5,
                       breakdown=[("gather_chunks_kernel", 1.0 + 3.0 * spill), ("score_logits_kernel", 0.2 * batch)])
    return measure


@settings(max_examples=60, deadline=None)
@given(largest=st.integers(1, 64), peak=st.integers(1, 64), fall=st.floats(0.05, 0.5))
def test_finds_a_batch_near_the_peak_within_its_points(largest, peak, fall):
    calls = []
    measure = one_peak(peak, fall)
    best, rows = batch_search.search(lambda b: calls.append(b) or measure(b), largest, max_points=8)
    assert len(calls) == len(set(calls)) <= 8  # each batch measured once, the budget kept
    assert all(1 <= b <= largest for b in calls) and largest in calls
    assert best.tok_s == max(r.tok_s for r in rows)
    truth = max(range(1, largest + 1), key=lambda b: measure(b).tok_s)
    # eight points of halving and bisection land within a quarter of the truth, or on it when it is the largest
    assert best.tok_s >= 0.75 * measure(truth).tok_s
    if truth == largest:
        assert best.batch == largest


def test_a_small_range_is_searched_exhaustively():
    measure = one_peak(5, 1.0)
    best, rows = batch_search.search(measure, 8, max_points=8)
    assert best.batch == 5


def test_verdict_names_memory_when_the_largest_is_fastest_and_values_leaving_hbm_otherwise():
    best, rows = batch_search.search(one_peak(64, 1.0), 16)
    assert best.batch == 16
    assert "largest that fits: bound by host memory" in batch_search.verdict(best, rows, 16, "host memory")
    best, rows = batch_search.search(one_peak(12, 1.0), 25)
    text = batch_search.verdict(best, rows, 25, "GPU memory")
    assert best.batch == 12 and "spare HBM fall from 100% to 50%" in text and "gather_chunks_kernel" in text


def test_failed_points_are_skipped_and_bad_arguments_refused():
    def measure(batch):  # out of memory above 10
        return FakeRow(batch, None, error="out of memory") if batch > 10 else FakeRow(batch, 10.0 * batch)
    best, rows = batch_search.search(measure, 40, max_points=6)
    assert best is not None and best.batch <= 10 and any(r.error for r in rows)
    assert batch_search.search(lambda b: FakeRow(b, None, error="x"), 4)[0] is None
    with pytest.raises(ValueError, match="largest >= 1"):
        batch_search.search(measure, 0)


def test_bench_best_marks_the_fastest_row_and_the_table_says_why(monkeypatch):
    from types import SimpleNamespace

    import torch

    from shadowkv_fx import bench, bench_report

    measure = one_peak(12, 0.35)

    def run_point(model, method, ids, steps, config, with_breakdown, fill, dense_peaks, measured):
        fake = measure(ids.shape[0])
        return bench.BenchRow(method, ids.shape[1], ids.shape[0], steps, tok_s=fake.tok_s, step_ms=1.0, prefill_s=1.0,
                              gpu_gib_per_seq=1.0, state_gib_per_seq=1.0, host_gib_per_seq=1.0, v_on_gpu=fake.v_on_gpu,
                              v_hit_rate=0.7, peak_gib=1.0, breakdown=fake.breakdown)

    monkeypatch.setattr(bench, "_run_point", run_point)
    monkeypatch.setattr(bench, "ensure_optimized", lambda model, config: None)
    monkeypatch.setattr(bench, "_release_memory", lambda: None)
    monkeypatch.setattr(bench, "largest_batch", lambda *a: SimpleNamespace(largest=25, bound="GPU memory"))
    model = SimpleNamespace(config=SimpleNamespace(vocab_size=50), device=torch.device("cpu"))
    rows = bench.bench(model, [64], ["best"], ["shadowkv"], 4, config=None, progress=lambda m: None)
    assert [r.batch for r in rows] == sorted(r.batch for r in rows) and 25 in [r.batch for r in rows]
    (best,) = [r for r in rows if r.best]
    assert best.batch == 12 and "spare HBM" in best.best
    assert "shadowkv fastest batch at context 64: batch 12" in bench_report.table(rows)


def test_a_search_on_skipped_prefills_measures_the_fastest_batch_again_with_a_real_one(monkeypatch):
    """--fill random/replicate spares the search a prefill per point; the fastest batch then gets one
    real-prefill row of its own (the row a user's real prompts would see), after the search's rows."""
    from types import SimpleNamespace

    import torch

    from shadowkv_fx import bench

    measure, fills = one_peak(12, 0.35), []

    def run_point(model, method, ids, steps, config, with_breakdown, fill, dense_peaks, measured):
        fake, kind = measure(ids.shape[0]), fill.for_batch(ids.shape[0])
        fills.append((ids.shape[0], kind))
        return bench.BenchRow(method, ids.shape[1], ids.shape[0], steps, tok_s=fake.tok_s, step_ms=1.0,
                              prefill_s=1.0 if kind == "prefill" else None, gpu_gib_per_seq=1.0, state_gib_per_seq=1.0,
                              host_gib_per_seq=1.0, v_on_gpu=fake.v_on_gpu, v_hit_rate=0.7, peak_gib=1.0,
                              fill=kind, breakdown=fake.breakdown)

    monkeypatch.setattr(bench, "_run_point", run_point)
    monkeypatch.setattr(bench, "ensure_optimized", lambda model, config: None)
    monkeypatch.setattr(bench, "_release_memory", lambda: None)
    monkeypatch.setattr(bench, "largest_batch", lambda *a: SimpleNamespace(largest=25, bound="GPU memory"))
    model = SimpleNamespace(config=SimpleNamespace(vocab_size=50), device=torch.device("cpu"))
    rows = bench.bench(model, [64], ["best"], ["shadowkv"], 4, None, progress=lambda m: None, random_fill_above=0,
                       fill="replicate")
    assert fills[-1] == (12, "prefill") and all(kind == "replicate" for _, kind in fills[:-1])
    twelve = [r for r in rows if r.batch == 12]
    assert [r.fill for r in twelve] == ["prefill", "replicate"] and twelve[1].best and not twelve[0].best
    # a search that prefilled every point measures nothing again
    fills.clear()
    bench.bench(model, [64], ["best"], ["shadowkv"], 4, None, progress=lambda m: None)
    assert all(kind == "prefill" for _, kind in fills) and len(fills) == len({b for b, _ in fills})
