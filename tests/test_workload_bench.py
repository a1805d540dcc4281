"""``bench --workload`` at a tiny scale on the CPU: a mixed stream of requests served by transformers'
continuous batching, ShadowKV continuous batching and ShadowKV static batches, each request getting
exactly its output length, with sane time-to-first-token figures and the JSON / table / plot written."""
import json
import re

import pytest
import torch
import typer

import shadowkv_fx
from shadowkv_fx import workload_bench as wb
from shadowkv_fx import workload_report
from tests.models import _dynamo_reset_for_the_module, _fresh_dynamo, tiny_pair  # noqa: F401

CHUNK = 4
SLOTS = 2


def config():
    """Two chunks selected per head from a rank-6 store: the sparse path, prompts compressed."""
    return shadowkv_fx.ShadowKVConfig(sparse_budget=2 * CHUNK, rank=6, chunk_size=CHUNK, local_chunks=2,
                                      outlier_chunks=2)


# transformers sizes its paged cache from free memory; on the shared CPU machine, a small fixed one
CPU_CACHE = {"num_blocks": 32, "max_batch_tokens": 256}


def optimize(model, config):
    """ShadowKV as FX graphs (no inductor: its C++ compiles take minutes on the CPU machine)."""
    shadowkv_fx.optimize(model, config)


@pytest.fixture(scope="module")
def served():
    """One tiny model through all three methods: 5 requests, prompts 24-64 tokens, outputs 2-9.
    The model ends dense (restored for dense-cb, the last method)."""
    model = tiny_pair("llama")[0]
    requests = wb.make_requests(5, 24, 64, 2, 9, CHUNK, seed=3)
    rows = wb.run_workload(model, requests, config(), slots=SLOTS, optimize=optimize, cb_overrides=CPU_CACHE,
                           progress=lambda msg: None)
    return model, requests, rows


def test_every_method_serves_every_request_its_exact_length(served):
    model, requests, rows = served
    assert [r.method for r in rows] == ["shadowkv-cb", "shadowkv-static", "dense-cb"]
    assert model._shadowkv is None and model.config._attn_implementation == "sdpa"  # restored, then given back
    for row in rows:
        assert row.error is None, (row.method, row.error)
        assert [p["generated"] for p in row.per_request] == [r.output_len for r in requests], row.method
        assert [p["prompt_len"] for p in row.per_request] == [r.prompt_len for r in requests]
        assert row.tok_s == pytest.approx(sum(r.output_len for r in requests) / row.total_s)
        assert row.requests_per_hour == pytest.approx(3600 * len(requests) / row.total_s)


def test_ttft_is_measured_from_arrival_and_ordered(served):
    _, _, rows = served
    for row in rows:
        ttfts = [p["ttft_s"] for p in row.per_request]
        assert all(0 < t <= p["end_s"] for t, p in zip(ttfts, row.per_request)), row.method
        assert row.ttft_p50_s <= row.ttft_p95_s <= max(ttfts)
        assert row.total_s == max(p["end_s"] for p in row.per_request)


def test_gaps_between_tokens_are_summarised_where_tokens_are_timed(served):
    _, requests, rows = served
    by = {r.method: r for r in rows}
    for method in ("shadowkv-cb", "dense-cb"):  # per-token timestamps: the longest wait between two tokens
        row = by[method]
        assert 0 < row.gap_p50_s <= row.gap_max_s < row.total_s, method
        assert all("gaps_s" not in p for p in row.per_request)
    assert by["shadowkv-static"].gap_max_s is None  # generate() streams no per-token times here


def test_slots_bound_the_requests_served_at_once(served):
    _, requests, rows = served
    by = {r.method: r for r in rows}
    assert 1 <= by["shadowkv-cb"].max_concurrent <= SLOTS
    assert by["shadowkv-static"].max_concurrent == SLOTS and by["shadowkv-static"].slots == SLOTS
    # a static batch's requests all end together, when its longest output does
    ends = [p["end_s"] for p in by["shadowkv-static"].per_request]
    assert len(set(ends)) == -(-len(requests) // SLOTS)


def test_writes_json_table_and_plot(served, tmp_path):
    _, requests, rows = served
    text = workload_report.write(tmp_path, rows, requests, {"requests": len(requests)}, "cpu")
    data = json.loads((tmp_path / "workload.json").read_text())
    assert {"settings", "device", "requests", "rows", "speedup_vs_static", "target"} <= set(data)
    assert len(data["requests"]) == len(requests)
    fields = {"method", "slots", "total_s", "requests_per_hour", "tok_s", "ttft_p50_s", "ttft_p95_s",
              "max_concurrent", "per_request", "error"}
    for row in data["rows"]:
        assert fields <= set(row)
    assert data["speedup_vs_static"] == pytest.approx(rows[0].tok_s / rows[1].tok_s)
    assert (tmp_path / "workload.png").stat().st_size > 0
    assert (tmp_path / "table.txt").read_text().strip() == text
    for method in wb.METHODS:
        assert method in text


def test_poisson_arrivals_wait_for_their_time(served):
    """Requests arriving later are admitted no earlier than they arrive: TTFT stays positive and the
    run lasts at least until the last arrival."""
    model = served[0]
    requests = wb.make_requests(3, 24, 40, 2, 4, CHUNK, rate=20.0, seed=1)
    assert requests[-1].arrival_s > 0
    (row,) = wb.run_workload(model, requests, config(), slots=SLOTS, methods=("shadowkv-cb",), optimize=optimize,
                             progress=lambda m: None)
    assert row.error is None, row.error
    assert all(p["ttft_s"] > 0 for p in row.per_request)
    assert row.total_s > requests[-1].arrival_s
    assert [p["generated"] for p in row.per_request] == [r.output_len for r in requests]


def test_request_stream_is_seeded_and_in_range():
    a = wb.make_requests(50, 30, 70, 5, 9, 8, rate=2.0, seed=7)
    assert a == wb.make_requests(50, 30, 70, 5, 9, 8, rate=2.0, seed=7)
    assert a != wb.make_requests(50, 30, 70, 5, 9, 8, rate=2.0, seed=8)
    assert all(r.prompt_len % 8 == 0 and 30 <= r.prompt_len <= 70 for r in a)
    assert all(5 <= r.output_len <= 9 for r in a)
    arrivals = [r.arrival_s for r in a]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0
    assert all(r.arrival_s == 0 for r in wb.make_requests(4, 30, 70, 5, 9, 8))
    prompts = wb.make_prompts(a[:3], vocab=96, seed=0)
    assert [len(p) for p in prompts] == [r.prompt_len for r in a[:3]]
    assert all(3 <= t < 96 for p in prompts for t in p)


@pytest.mark.parametrize("args", [(0, 30, 70, 5, 9, 8), (4, 70, 30, 5, 9, 8), (4, 30, 70, 9, 5, 8),
                                  (4, 33, 39, 5, 9, 8), (4, 30, 70, 5, 9, 8, -1.0)])
def test_bad_stream_settings_are_refused(args):
    with pytest.raises(ValueError):
        wb.make_requests(*args)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown workload methods"):
        wb.run_workload(torch.nn.Module(), [], config(), methods=("dense-eager",))


def test_percentile_and_overlap():
    assert wb.percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert wb.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == pytest.approx(4.8)
    assert wb.max_overlap([(0, 2), (1, 3), (2.5, 4), (5, 6)]) == 2
    assert wb.max_overlap([(0, 1), (1, 2)]) == 1  # one ends as the next starts


def test_default_slots_need_the_gpu_preflight():
    """On a CPU the slots must be given: refused before any method runs."""
    model = tiny_pair("llama")[0]
    with pytest.raises(ValueError, match="give slots"):
        wb.run_workload(model, wb.make_requests(2, 24, 40, 2, 3, CHUNK), config(), progress=lambda m: None)


def test_a_failing_method_is_its_row_and_the_rest_run(served):
    """A dense-cb that cannot start (a setting transformers does not know) is a row with its error; the
    ShadowKV method before it ran, and the model's attention is its own again."""
    model = served[0]
    requests = wb.make_requests(2, 24, 40, 2, 3, CHUNK, seed=5)
    cb, dense = wb.run_workload(model, requests, config(), slots=SLOTS, methods=("dense-cb", "shadowkv-cb"),
                                optimize=optimize, cb_overrides={"no_such_setting": 1}, progress=lambda m: None)
    assert dense.method == "dense-cb" and "no_such_setting" in dense.error and dense.tok_s is None
    assert cb.error is None and [p["generated"] for p in cb.per_request] == [r.output_len for r in requests]
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("method", wb.METHODS)
def test_a_method_past_its_limit_is_stopped_with_a_bound(served, method):
    """limit_s: a method still serving then is stopped (a batcher's open requests dropped, static between
    batches), and its row says the tokens/s it stayed below; the model serves again afterwards."""
    model = served[0]
    requests = wb.make_requests(3, 24, 40, 100, 100, CHUNK, seed=2)
    (row,) = wb.run_workload(model, requests, config(), slots=SLOTS, methods=(method,), optimize=optimize,
                             cb_overrides=CPU_CACHE, limit_s=1e-3, progress=lambda m: None)
    # 300 tokens in all: more than 1 ms means fewer than 300 / 1e-3 tokens/s
    assert re.fullmatch(r"Overtime: stopped after 0 s, [0-2] of 3 requests finished: tokens/s below 300000\.0",
                        row.error), row.error
    assert row.tok_s is None
    # what finished before the limit stays, with its times (where the time went)
    assert len(row.per_request) == int(re.search(r"(\d) of 3", row.error).group(1))
    assert all({"request", "ttft_s", "end_s"} <= set(p) and "gaps_s" not in p for p in row.per_request)
    (again,) = wb.run_workload(model, requests[:1], config(), slots=SLOTS, methods=(method,), optimize=optimize,
                               cb_overrides=CPU_CACHE, progress=lambda m: None)
    assert again.error is None and again.per_request[0]["generated"] == 100


def test_the_cli_wiring_writes_its_files_and_command(monkeypatch, tmp_path):
    """``bench --workload``'s body on the tiny model (the 8B builder, the GPU name and inductor swapped out):
    every method's row, and the command and settings in workload.json."""
    from shadowkv_fx import bench, cli

    model = tiny_pair("llama")[0]
    monkeypatch.setattr(bench, "llama31_8b_random", lambda layers: model)
    monkeypatch.setattr(bench, "ensure_optimized", optimize)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "cpu (test)")
    monkeypatch.setattr("sys.argv", ["shadowkv-fx", "bench", "--workload"])
    settings = {"requests": 3, "min_context": 24, "max_context": 48, "min_output": 2, "max_output": 4,
                "output_dist": "log-uniform", "rate": 0.0,
                "slots": 2, "prefill_chunk": 16, "seed": 0, "limit_s": None}
    monkeypatch.setattr(wb, "run_dense_cb", lambda *a, **k: wb.WorkloadRow("dense-cb", None, 3, error="skipped"))
    cli._workload(settings, config(), list(wb.METHODS), tmp_path, None, 2)
    data = json.loads((tmp_path / "workload.json").read_text())
    assert data["settings"]["command"] == "shadowkv-fx bench --workload" and data["device"] == "cpu (test)"
    assert [r["method"] for r in data["rows"]] == list(wb.METHODS)
    assert all(r["error"] is None for r in data["rows"][:2])
    assert "(log-uniform, total" in (tmp_path / "table.txt").read_text()
    with pytest.raises(typer.BadParameter, match="must be >= 1"):
        cli._workload({**settings, "prefill_chunk": 0}, config(), list(wb.METHODS), tmp_path, None, 2)


def test_log_uniform_outputs_are_heavy_tailed_and_in_range():
    uniform = wb.make_requests(400, 32, 64, 64, 2048, 8, seed=1)
    heavy = wb.make_requests(400, 32, 64, 64, 2048, 8, seed=1, output_dist="log-uniform")
    assert all(64 <= r.output_len <= 2048 for r in heavy)
    short = sum(r.output_len < 256 for r in heavy)  # log-uniform: 2 of the 5 octaves, ~40%; uniform: ~10%
    assert short > 2.5 * sum(r.output_len < 256 for r in uniform)
    with pytest.raises(ValueError, match="output_dist"):
        wb.make_requests(4, 32, 64, 64, 2048, 8, output_dist="zipf")
