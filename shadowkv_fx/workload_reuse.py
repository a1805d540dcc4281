"""``bench --workload --reuse``: many questions about a few long documents, arriving interleaved (issue #31).

The stream (``make_reuse_stream``, seeded): ``documents`` documents of ``context`` random tokens,
``questions`` questions each (``q_min``-``q_max`` random tokens, ``output`` generated tokens, eos
off), arriving round-robin over the documents, all at t=0: document 0's first question, document
1's first, ..., then every document's second, and so on. Two methods, same stream, same process:

- ``shadowkv-reuse``: continuous batching over ``ShadowKVSlots`` with a ``PrefixStore``
  (``prefix_len`` = the document): a document's first question prefills and stores it, later ones
  start from a copy of its compressed state and prefill only their own tokens.
- ``dense-reuse``: transformers' prompt-reuse recipe, one request at a time: the document prefilled
  into a ``DynamicCache`` once, each question ``generate()``-d on ``copy.deepcopy`` of it. It holds
  as many documents' caches as ``hold_bytes`` allows (on a GPU: free memory less room for one copy
  and the prefill's working set), least recently used out, and prefills a dropped one again.

Per method: total seconds, generated tokens/s, time to first token (arrival to first token) of
each document's first question and of the later ones (p50 / p95), and of the later ones from the
moment each is served (a slot taken, or dense's turn: what a question waits beyond the queue, the
part a prefix store can shorten), document prefills, documents held at most, and the bytes holding
them (ShadowKV: device and host; dense: its KV caches).
"""
from __future__ import annotations

import copy
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from shadowkv_fx.workload_stream import WorkloadRequest, percentile

METHODS = ("shadowkv-reuse", "dense-reuse")


@dataclass
class ReuseRequest:
    document: int
    question: int  # 0: the document's first question
    question_len: int
    output_len: int
    arrival_s: float = 0.0


@dataclass
class ReuseRow:
    method: str
    requests: int
    total_s: float | None = None
    tok_s: float | None = None
    ttft_first_p50_s: float | None = None
    ttft_first_p95_s: float | None = None
    ttft_later_p50_s: float | None = None
    ttft_later_p95_s: float | None = None
    # from the moment it is served (a slot taken, or dense's turn) to its first token: TTFT less the queue
    served_later_p50_s: float | None = None
    served_later_p95_s: float | None = None
    document_prefills: int | None = None  # dense prefills a dropped document again
    documents_held: int | None = None  # most documents' states held at once
    device_bytes: int | None = None  # holding the documents (ShadowKV: the store; dense: the KV caches held)
    host_bytes: int | None = None
    # ShadowKV: the serving loop's host seconds per admission phase (ShadowKVSlots.host_seconds) and the
    # decode steps captured as CUDA graphs during the run (each drop of a captured step costs one)
    host_seconds: dict = field(default_factory=dict)
    captures: int | None = None
    note: str = ""
    error: str | None = None
    per_request: list = field(default_factory=list)  # dicts: document, question, ttft_s, end_s, generated


def make_reuse_stream(documents: int, questions: int, q_min: int, q_max: int, output: int,
                      seed: int = 0) -> list[ReuseRequest]:
    """Round-robin over the documents, question by question (seeded question lengths)."""
    if documents < 1 or questions < 1 or not 0 < q_min <= q_max or output < 1:
        raise ValueError(f"a reuse stream needs documents >= 1, questions >= 1, 0 < q_min <= q_max and output >= 1, "
                         f"got {documents}, {questions}, [{q_min}, {q_max}], {output}")
    rng = random.Random(seed)
    return [ReuseRequest(d, j, rng.randint(q_min, q_max), output) for j in range(questions) for d in range(documents)]


def make_reuse_prompts(stream: list[ReuseRequest], context: int, vocab: int,
                       seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """The documents (``context`` random ids each) and every request's prompt: its document + question."""
    gen = torch.Generator().manual_seed(seed)
    docs = [torch.randint(3, vocab, (context,), generator=gen).tolist() for _ in range(max(r.document for r in stream) + 1)]
    prompts = [docs[r.document] + torch.randint(3, vocab, (r.question_len,), generator=gen).tolist() for r in stream]
    return docs, prompts


def _finish(row: ReuseRow, stream: list[ReuseRequest], per_request: list[dict]) -> ReuseRow:
    for p in per_request:
        p.pop("gaps_s", None)
    row.per_request = per_request
    row.total_s = max(p["end_s"] for p in per_request)
    row.tok_s = sum(p["generated"] for p in per_request) / row.total_s
    first = [p["ttft_s"] for p, r in zip(per_request, stream) if r.question == 0]
    later = [p["ttft_s"] for p, r in zip(per_request, stream) if r.question > 0]
    row.ttft_first_p50_s, row.ttft_first_p95_s = percentile(first, 50), percentile(first, 95)
    if later:
        row.ttft_later_p50_s, row.ttft_later_p95_s = percentile(later, 50), percentile(later, 95)
        served = _served_times(zip(per_request, stream))["later"]
        row.served_later_p50_s, row.served_later_p95_s = percentile(served, 50), percentile(served, 95)
    return row


def run_shadowkv_reuse(model, stream: list[ReuseRequest], docs: list[list[int]], prompts: list[list[int]],
                       slots: int, prefill_chunk: int, store_bytes: int | None = None,
                       limit_s: float | None = None) -> ReuseRow:
    """Continuous batching of an optimized ``model`` with a ``PrefixStore`` of ``store_bytes``."""
    from shadowkv_fx import cache_share, cuda_graph
    from shadowkv_fx.serving import PrefixStore, ServingManager, ShadowKVSlots
    from shadowkv_fx.workload_bench import Overtime, _eos_off_quietly, _serve, warm_shadowkv_slots

    longest = max(len(p) + r.output_len for p, r in zip(prompts, stream))
    store = PrefixStore(store_bytes)
    backend = ShadowKVSlots(model, slots, longest, prefill_chunk, prefix_store=store)
    row = ReuseRow("shadowkv-reuse", len(stream), note=f"{slots} slots, prefix store, prefill pieces of {prefill_chunk}")
    timed = [WorkloadRequest(len(p), r.output_len, r.arrival_s) for p, r in zip(prompts, stream)]
    with _eos_off_quietly():
        warm_shadowkv_slots(backend, model.config.vocab_size, min(4096, len(docs[0])))
        _warm_questions(backend, model.config.vocab_size, min(4096, len(docs[0]) - 1), stream)
        misses = store.misses  # the warm-up's prompts looked the store up too
        backend.host_seconds.clear()
        captured = cuda_graph.captures()
        with ServingManager(backend) as manager:
            def add(i):
                manager.add_request(prompts[i], request_id=f"w{i}", max_new_tokens=stream[i].output_len,
                                    prefix_len=len(docs[stream[i].document]), eos_token_id=-1, do_sample=False,
                                    record_timestamps=True)

            try:
                per_request, _ = _serve(add, lambda timeout: manager.get_result(timeout=timeout), manager.is_running,
                                        timed, model.device, limit_s)
            except Overtime as over:  # its finished requests say which question of which document they were
                for p in over.finished:
                    p.update(document=stream[p["request"]].document, question=stream[p["request"]].question)
                over.details.update(host_seconds=dict(backend.host_seconds), captures=cuda_graph.captures() - captured)
                raise
    row.host_seconds, row.captures = dict(backend.host_seconds), cuda_graph.captures() - captured
    held = cache_share.distinct_bytes([store.stored(d) for d in store.documents()])
    row.document_prefills, row.documents_held = store.misses - misses, len(store)
    row.device_bytes, row.host_bytes = held["device"], held["host"]
    return _finish(row, stream, [{**p, "document": r.document, "question": r.question}
                                 for p, r in zip(per_request, stream)])


def _warm_questions(backend, vocab: int, length: int, stream: list[ReuseRequest]) -> None:
    """Untimed: a warm-up document asked the stream's shortest and longest question (a miss that
    stores it, then a hit), so the hit path's multi-token steps have compiled before the clock
    starts; the document then leaves the store."""
    from shadowkv_fx.serving import generate_batch

    gen = torch.Generator().manual_seed(1)
    doc = torch.randint(3, vocab, (length,), generator=gen).tolist()
    lengths = sorted({min(r.question_len for r in stream), max(r.question_len for r in stream)})
    prompts = [doc + torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths for _ in range(2)]
    generate_batch(backend, prompts, max_new_tokens=2, eos_token_id=-1, do_sample=False, seeds=[0] * len(prompts),
                   prefix_lens=[length] * len(prompts))
    backend.prefix_store.clear()


def document_kv_bytes(model, context: int) -> int:
    """Dense KV cache bytes of one ``context``-token document (keys and values, every layer)."""
    from shadowkv_fx.preflight import head_shape

    _, kv_heads, head_dim = head_shape(model.config)
    return 2 * model.config.num_hidden_layers * kv_heads * head_dim * context * next(model.parameters()).element_size()


def dense_hold_bytes(model, context: int, margin: float = 2**30) -> int:
    """Bytes of GPU memory dense may fill with held documents: free memory less one more document's
    KV (the copy a question runs on) and a prefill's working set (its MLP activations)."""
    work = 3 * context * model.config.intermediate_size * next(model.parameters()).element_size()
    free, _ = torch.cuda.mem_get_info()
    return max(0, int(free - document_kv_bytes(model, context) - work - margin))


def _kv_bytes(cache) -> int:
    return sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)


def _held_bytes(held: dict) -> int:
    return sum(_kv_bytes(c) for c in held.values())


def run_dense_reuse(model, stream: list[ReuseRequest], docs: list[list[int]], prompts: list[list[int]],
                    hold_bytes: int, limit_s: float | None = None) -> ReuseRow:
    """transformers' recipe, one request at a time, holding documents' ``DynamicCache``s up to ``hold_bytes``."""
    from transformers import DynamicCache

    from shadowkv_fx import compat
    from shadowkv_fx.workload_bench import _FirstToken, _over, _sync

    held: OrderedDict[int, DynamicCache] = OrderedDict()  # least recently used first
    row = ReuseRow("dense-reuse", len(stream), note=f"DynamicCache + copy.deepcopy, one at a time, "
                   f"{hold_bytes / 2**30:.1f} GiB for held documents")
    row.document_prefills, row.documents_held, most_bytes = 0, 0, 0
    timed = [WorkloadRequest(len(p), r.output_len, r.arrival_s) for p, r in zip(prompts, stream)]
    per_request: list[dict] = []
    device = model.device
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for r, prompt in zip(stream, prompts):
            _over(limit_s, t0, timed, per_request)
            start = time.perf_counter() - t0
            cache = held.pop(r.document, None)
            if cache is None:
                cache = DynamicCache()
                doc = torch.tensor([docs[r.document]], device=device)
                model(input_ids=doc, **{compat.CACHE_ARG: cache}, use_cache=True, logits_to_keep=1)
                row.document_prefills += 1
            size = _kv_bytes(cache)
            while held and _held_bytes(held) + size > hold_bytes:
                held.popitem(last=False)
            if size <= hold_bytes:
                held[r.document] = cache
            row.documents_held = max(row.documents_held, len(held))
            most_bytes = max(most_bytes, _held_bytes(held))
            ids = torch.tensor([prompt], device=device)
            streamer = _FirstToken()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **{compat.CACHE_ARG: copy.deepcopy(cache)},
                                 do_sample=False, max_new_tokens=r.output_len, min_new_tokens=r.output_len,
                                 eos_token_id=None, pad_token_id=0, streamer=streamer)
            _sync(device)
            end = time.perf_counter() - t0
            per_request.append({"request": len(per_request), "document": r.document, "question": r.question,
                                "prompt_len": len(prompt),
                                "generated": int(out.shape[1] - ids.shape[1]), "ttft_s": streamer.first - t0,
                                "start_s": start, "end_s": end})
            del cache
    row.device_bytes, row.host_bytes = most_bytes, 0
    return _finish(row, stream, per_request)


def run_reuse(model, stream: list[ReuseRequest], context: int, config, slots: int, prefill_chunk: int = 4096,
              store_bytes: int | None = None, hold_bytes: int | None = None, methods: tuple[str, ...] = METHODS,
              optimize=None, progress=print, seed: int = 0, limit_s: float | None = None) -> list[ReuseRow]:
    """Every method of ``methods`` over the stream: ShadowKV first (``optimize(model, config)``, default
    ``bench.ensure_optimized``), then dense on the ``restore``d model (``hold_bytes`` None: on a GPU,
    ``dense_hold_bytes``). A method that fails or runs past ``limit_s`` gets a row with its error."""
    import shadowkv_fx
    from shadowkv_fx import bench
    from shadowkv_fx.workload_bench import run_method

    check_methods(methods)
    if "dense-reuse" in methods and hold_bytes is None and model.device.type != "cuda":
        raise ValueError("dense's held-document bytes come from the GPU's free memory: give hold_bytes on a CPU")
    docs, prompts = make_reuse_prompts(stream, context, model.config.vocab_size, seed)
    rows: list[ReuseRow] = []

    def attempt(method, fn):
        rows.append(run_method("reuse", method, fn, lambda error: ReuseRow(method, len(stream), error=error), progress))

    if "shadowkv-reuse" in methods:
        if getattr(model, "_shadowkv", None) is None:
            (optimize or bench.ensure_optimized)(model, config)
        attempt("shadowkv-reuse", lambda: run_shadowkv_reuse(model, stream, docs, prompts, slots, prefill_chunk,
                                                             store_bytes, limit_s))
    if "dense-reuse" in methods:
        if getattr(model, "_shadowkv", None) is not None:
            shadowkv_fx.restore(model)
        hold = hold_bytes if hold_bytes is not None else dense_hold_bytes(model, context)
        attempt("dense-reuse", lambda: run_dense_reuse(model, stream, docs, prompts, hold, limit_s))
    return rows


def check_methods(methods) -> None:
    """``ValueError`` naming the known methods for any name of ``methods`` that is not one."""
    if unknown := set(methods) - set(METHODS):
        raise ValueError(f"unknown reuse methods {sorted(unknown)}; known: {', '.join(METHODS)}")


def table(rows: list[ReuseRow], stream: list[ReuseRequest], context: int, device: str) -> str:
    docs = max(r.document for r in stream) + 1
    lines = [f"reuse workload on {device}: {docs} documents of {context} tokens, {len(stream) // docs} questions each "
             f"({min(r.question_len for r in stream)}-{max(r.question_len for r in stream)} tokens, "
             f"{stream[0].output_len} generated), interleaved, all at t=0",
             f"{'method':<16}{'total s':>9}{'tok/s':>8}{'TTFT 1st p50':>13}{'p95':>7}{'TTFT later p50':>15}{'p95':>7}"
             f"{'served later p50':>17}{'p95':>7}{'doc prefills':>13}{'docs held':>10}{'device GiB':>11}{'host GiB':>9}  note"]
    for r in rows:
        if r.error:
            lines.append(f"{r.method:<16}  {r.error}")
            if r.per_request:
                served_times = _served_times((p, stream[p["request"]]) for p in r.per_request)
                served = ", served to first token p50 " + ", ".join(
                    f"{kind} {percentile(times, 50):.2f} s" for kind, times in served_times.items() if times)
                lines.append(f"{'':<16}  the part that ran: {len(r.per_request)} requests, "
                             f"{_ran_tok_s(r):.1f} tok/s to the last of them{served}")
            continue
        later = ["-"] * 4 if r.ttft_later_p50_s is None else [
            f"{t:.2f}" for t in (r.ttft_later_p50_s, r.ttft_later_p95_s, r.served_later_p50_s, r.served_later_p95_s)]
        lines.append(f"{r.method:<16}{r.total_s:>9.1f}{r.tok_s:>8.1f}{r.ttft_first_p50_s:>13.2f}{r.ttft_first_p95_s:>7.2f}"
                     f"{later[0]:>15}{later[1]:>7}{later[2]:>17}{later[3]:>7}{r.document_prefills:>13}{r.documents_held:>10}"
                     f"{r.device_bytes / 2**30:>11.2f}{r.host_bytes / 2**30:>9.2f}  {r.note}")
    for r in rows:
        if r.host_seconds:
            phases = ", ".join(f"{phase} {s:.1f} s" for phase, s in sorted(r.host_seconds.items()))
            lines.append(f"{r.method}: serving loop's host time in admissions: {phases}; decode steps captured: {r.captures}")
    rates = {r.method: (r.tok_s, "") if not r.error else (_ran_tok_s(r), " the part that ran") for r in rows
             if not r.error or r.per_request}
    if len(rates) == 2:
        (ours, how), (theirs, their_how) = rates["shadowkv-reuse"], rates["dense-reuse"]
        lines.append(f"shadowkv-reuse{how} / dense-reuse{their_how} tokens/s: {ours / theirs:.2f}x")
    return "\n".join(lines)


def _ran_tok_s(row: ReuseRow) -> float:
    """Tokens/s of a stopped method's finished requests, over the time to the last of them: below
    what it sustained by the tokens of the requests still in flight (none for dense, which serves one
    at a time; up to a slot's worth each for ShadowKV)."""
    return sum(p["generated"] for p in row.per_request) / max(p["end_s"] for p in row.per_request)


def _served_times(records) -> dict[str, list[float]]:
    """Seconds from being served (a slot taken, or dense's turn) to the first token: TTFT (from its
    arrival) less the queue, of each document's first question and of the later ones; ``records``:
    pairs of a request's record and its ``ReuseRequest``."""
    served = [(r.question, p["ttft_s"] + r.arrival_s - p["start_s"]) for p, r in records]
    return {"first": [s for q, s in served if q == 0], "later": [s for q, s in served if q > 0]}
