"""``bench --workload --reuse`` at a tiny scale on the CPU: questions about a few documents, ShadowKV's
prefix store against transformers' deepcopy recipe, every request served its exact length, documents
prefilled once (ShadowKV) or again when dropped (dense)."""
import pytest
import typer

import shadowkv_fx
from shadowkv_fx import workload_reuse as wr
from tests.models import _dynamo_reset_for_the_module, _fresh_dynamo, tiny_pair  # noqa: F401

CHUNK = 4
CONTEXT = 40


def config():
    return shadowkv_fx.ShadowKVConfig(sparse_budget=2 * CHUNK, rank=6, chunk_size=CHUNK, local_chunks=2,
                                      outlier_chunks=2)


@pytest.fixture(scope="module")
def served():
    model = tiny_pair("llama")[0]
    stream = wr.make_reuse_stream(2, 3, 2, 5, 3, seed=1)
    # dense holds one document: round-robin arrivals find the other one dropped every time
    rows = wr.run_reuse(model, stream, CONTEXT, config(), slots=2, prefill_chunk=16,
                        hold_bytes=wr.document_kv_bytes(model, CONTEXT) + 64, optimize=lambda m, c: shadowkv_fx.optimize(m, c),
                        progress=lambda msg: None)
    return model, stream, rows


def test_stream_is_round_robin_over_documents_and_seeded():
    stream = wr.make_reuse_stream(3, 2, 4, 9, 7, seed=5)
    assert [(r.document, r.question) for r in stream] == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
    assert stream == wr.make_reuse_stream(3, 2, 4, 9, 7, seed=5) != wr.make_reuse_stream(3, 2, 4, 9, 7, seed=6)
    assert all(4 <= r.question_len <= 9 and r.output_len == 7 for r in stream)
    docs, prompts = wr.make_reuse_prompts(stream, 20, 50)
    assert len(docs) == 3 and all(p[:20] == docs[r.document] for p, r in zip(prompts, stream))
    with pytest.raises(ValueError, match="q_min <= q_max"):
        wr.make_reuse_stream(2, 2, 9, 4, 7)


def test_every_request_gets_its_length_and_documents_are_prefilled_as_held(served):
    model, stream, rows = served
    by = {r.method: r for r in rows}
    assert list(by) == ["shadowkv-reuse", "dense-reuse"] and model._shadowkv is None  # restored for dense
    for row in rows:
        assert row.error is None, (row.method, row.error)
        assert [p["generated"] for p in row.per_request] == [r.output_len for r in stream], row.method
        assert 0 < row.ttft_first_p50_s and 0 < row.ttft_later_p50_s <= row.total_s
        # served: from its slot (or turn) to its first token, so never longer than from its arrival
        assert 0 < row.served_later_p50_s <= row.ttft_later_p50_s and row.served_later_p95_s <= row.ttft_later_p95_s
        assert all(0 <= p["start_s"] <= p["ttft_s"] + 1e-9 for p in row.per_request), row.method
    assert by["shadowkv-reuse"].document_prefills == 2 and by["shadowkv-reuse"].documents_held == 2
    assert by["shadowkv-reuse"].device_bytes > 0
    assert by["dense-reuse"].document_prefills == len(stream) and by["dense-reuse"].documents_held == 1
    # where the serving loop's time went: every admission phase ran (2 documents prefilled, 6 questions
    # asked of copies, 6 rows adopted), none of it measured as zero; no CUDA graph on the CPU
    phases = by["shadowkv-reuse"].host_seconds
    assert set(phases) == {"lookup", "document", "question", "adopt"} and all(s > 0 for s in phases.values()), phases
    assert by["shadowkv-reuse"].captures == 0


def test_table_says_both_rows_and_the_ratio(served):
    _, stream, rows = served
    text = wr.table(rows, stream, CONTEXT, "cpu")
    assert "2 documents of 40 tokens, 3 questions each" in text
    assert "shadowkv-reuse" in text and "dense-reuse" in text and "tokens/s:" in text


def test_the_cli_wiring_writes_its_files(monkeypatch, tmp_path):
    """``bench --workload --reuse``'s body on the tiny model (the 8B builder and the GPU name swapped out,
    dense's hold bound given): both rows and the settings in reuse.json."""
    import json

    import torch

    from shadowkv_fx import bench, cli

    model = tiny_pair("llama")[0]
    monkeypatch.setattr(bench, "llama31_8b_random", lambda layers: model)
    monkeypatch.setattr(bench, "ensure_optimized", lambda m, c: shadowkv_fx.optimize(m, c))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "cpu (test)")
    monkeypatch.setattr("sys.argv", ["shadowkv-fx", "bench", "--workload", "--reuse"])
    settings = {"max_context": CONTEXT, "prefill_chunk": 16, "seed": 0, "limit_s": None, "documents": 2, "questions": 2,
                "question_min": 2, "question_max": 4, "output": 3, "store_bytes": None, "slots": 2,
                "hold_bytes": 10**9, "methods": list(wr.METHODS)}
    cli._workload_reuse(settings, config(), tmp_path, None, 2)
    data = json.loads((tmp_path / "reuse.json").read_text())
    assert [r["method"] for r in data["rows"]] == list(wr.METHODS) and all(r["error"] is None for r in data["rows"])
    assert data["settings"]["command"] == "shadowkv-fx bench --workload --reuse" and len(data["stream"]) == 4
    assert data["rows"][1]["document_prefills"] == 2  # dense held both documents: each prefilled once
    assert "shadowkv-reuse / dense-reuse tokens/s" in (tmp_path / "table.txt").read_text()
    # --reuse-methods: ShadowKV alone (dense measured in an earlier call), or a name it does not know, refused first
    cli._workload_reuse({**settings, "methods": ["shadowkv-reuse"]}, config(), tmp_path, None, 2)
    data = json.loads((tmp_path / "reuse.json").read_text())
    assert [r["method"] for r in data["rows"]] == ["shadowkv-reuse"] and data["rows"][0]["error"] is None
    with pytest.raises(typer.BadParameter, match="unknown reuse methods"):
        cli._workload_reuse({**settings, "methods": ["dense"]}, config(), tmp_path, None, 2)


def test_an_overtime_row_keeps_the_finished_questions(served, monkeypatch):
    """Past limit_s a method is stopped; its row keeps each finished question's times, with its document
    and question number, so a run cut short still says where its time went. (The clock is made to run
    out once two questions have finished, so there are records to keep.)"""
    from shadowkv_fx import workload_bench as wb

    def over(limit_s, t0, requests, finished):
        records = list(finished() if callable(finished) else finished)
        if len(records) >= 2:
            raise wb.Overtime(f"stopped after 0 s, {len(records)} of {len(requests)} requests finished", records)

    monkeypatch.setattr(wb, "_over", over)
    model, stream, _ = served
    rows = wr.run_reuse(model, stream, CONTEXT, config(), slots=2, prefill_chunk=16, hold_bytes=10**9,
                        optimize=lambda m, c: shadowkv_fx.optimize(m, c), progress=lambda msg: None, limit_s=1.0)
    assert set(rows[0].host_seconds) >= {"document", "question", "adopt"}  # kept past the limit too
    for row in rows:
        assert row.error.startswith("Overtime: stopped after 0 s") and row.tok_s is None, row.method
        assert len(row.per_request) >= 2, row.method
        for p in row.per_request:
            r = stream[p["request"]]
            assert (p["document"], p["question"]) == (r.document, r.question), row.method
            assert 0 <= p["ttft_s"] <= p["end_s"] and p["generated"] == r.output_len and "gaps_s" not in p
    # the table says what each stopped method sustained while it ran, and compares those rates
    text = wr.table(rows, stream, CONTEXT, "cpu")
    for row in rows:
        rate = sum(p["generated"] for p in row.per_request) / max(p["end_s"] for p in row.per_request)
        assert f"the part that ran: {len(row.per_request)} requests, {rate:.1f} tok/s" in text, row.method
    assert "shadowkv-reuse the part that ran / dense-reuse the part that ran tokens/s:" in text
