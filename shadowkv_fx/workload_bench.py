"""``shadowkv-fx bench --workload``: one stream of requests served three ways, same model, same run.

The stream (``make_requests``, seeded): N requests, prompt lengths uniform in [min, max] context
rounded down to the chunk size, output lengths uniform in [min, max] output, arriving all at t=0
(``rate`` 0, the default) or as a Poisson process of ``rate`` requests per second. Prompts are
random token ids. Every request generates exactly its output length: eos is off (``eos_token_id``
-1 for the continuous batchers, ``min_new_tokens`` for ``generate()``).

Methods, run in this order on one model (ShadowKV first, so a run cut short keeps its rows):

- ``shadowkv-cb``: ``ServingManager`` over ``ShadowKVSlots`` of ``slots`` rows (default: one below
  the preflight's largest static batch at the longest prompt and output).
- ``shadowkv-static``: the same requests in arrival order, in static batches of ``slots``; a batch
  starts once its last request has arrived and the previous batch ended, runs ``generate()`` until
  its longest output ends (left-padded prompts), and a row counts only its own output length.
- ``dense-cb``: the model ``restore``d, served by transformers' own continuous batching
  (``model.init_continuous_batching``, what ``model.generate_batch`` runs), its paged KV cache
  sized by transformers from free GPU memory: as many requests at once as fit. It switches to
  flash attention where the flash_attn package is installed; without it, ``paged|sdpa`` gathers
  every running request's keys and values, repeated per query head, for each layer and step.

Per method: seconds from the first arrival to the last token, requests/hour, generated tokens/s,
time to first token (arrival to first token: the token's timestamp for the batchers, the batch's
first streamed token for static) p50 / p95. Untimed warm-up first (compiles, CUDA graph capture
of the slots' step, transformers' ``warmup``); a static batch's CUDA graph capture is timed, as a
server would pay it per batch. ``--workload-limit-s``: a method still running then is stopped,
and its row gives the bound that implies (tokens/s below all tokens / limit).

Measured on an H100 (16 requests of 8K-32K prompts, 4 slots; commands and numbers):
``benchmarks/results/h100_workload_32k_{log,uniform}/`` and ``benchmarks/RESULTS.md``. A stream of
122K prompts with dense-cb does not fit a 10-minute device call.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import torch

from shadowkv_fx.workload_stream import WorkloadRequest, make_prompts, make_requests, max_overlap, percentile

__all__ = ["METHODS", "WorkloadRequest", "WorkloadRow", "make_prompts", "make_requests", "max_overlap", "percentile",
           "run_workload"]
METHODS = ("shadowkv-cb", "shadowkv-static", "dense-cb")  # the order they run in
WARM_PROMPT = 4096  # tokens of the warm-up prompts: compiles and captures, a few seconds of prefill
_POLL_S = 1.0  # how long a wait for a result blocks before checking that the serving loop is alive


@dataclass
class WorkloadRow:
    method: str
    slots: int | None  # rows decoded together at most (dense-cb: its KV capacity over the longest request)
    requests: int
    total_s: float | None = None
    requests_per_hour: float | None = None
    tok_s: float | None = None  # generated tokens per second
    ttft_p50_s: float | None = None
    ttft_p95_s: float | None = None
    max_concurrent: int | None = None  # requests holding a slot at once (from their lifespans)
    # the longest wait between two tokens of one request, and the median wait: what a prefill piece
    # run between decode steps costs the running rows (per-token timestamps; static generate() has none)
    gap_max_s: float | None = None
    gap_p50_s: float | None = None
    note: str = ""
    error: str | None = None
    per_request: list = field(default_factory=list)  # dicts: prompt_len, output_len, generated, ttft_s, end_s


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _finish_row(row: WorkloadRow, per_request: list[dict]) -> WorkloadRow:
    """Fill ``row``'s totals from each request's result (``ttft_s``, ``end_s``: seconds from the stream's start)."""
    row.per_request = per_request
    row.total_s = max(p["end_s"] for p in per_request)
    row.requests_per_hour = 3600 * len(per_request) / row.total_s
    row.tok_s = sum(p["generated"] for p in per_request) / row.total_s
    ttfts = [p["ttft_s"] for p in per_request]
    row.ttft_p50_s, row.ttft_p95_s = percentile(ttfts, 50), percentile(ttfts, 95)
    gaps = [g for p in per_request for g in p.get("gaps_s", [])]
    if gaps:
        row.gap_max_s, row.gap_p50_s = max(gaps), percentile(gaps, 50)
    for p in per_request:
        p.pop("gaps_s", None)  # summarised: one float per token would swell workload.json
    return row


class Overtime(RuntimeError):
    """A method ran past its ``limit_s``: stopped, its row says how far it got and keeps the
    ``finished`` requests' records (where the time went, for the part that ran) and any ``details``
    (row fields) the method adds on its way out."""

    def __init__(self, message: str, finished: list[dict] | None = None):
        super().__init__(message)
        self.finished = finished or []
        self.details: dict = {}


def _over(limit_s: float | None, t0: float, requests: list[WorkloadRequest], finished) -> None:
    """Raise ``Overtime`` past ``limit_s``; ``finished``: the finished requests' records, or a
    function that builds them (called only then)."""
    if limit_s and time.perf_counter() - t0 > limit_s:
        records = list(finished() if callable(finished) else finished)
        # it needs longer than limit_s for the whole stream, so its tokens/s is below this
        bound = sum(r.output_len for r in requests) / limit_s
        raise Overtime(f"stopped after {limit_s:.0f} s, {len(records)} of {len(requests)} requests finished: "
                       f"tokens/s below {bound:.1f}", records)


def _serve(add, get_result, alive, requests: list[WorkloadRequest], device: torch.device,
           limit_s: float | None = None) -> tuple[list[dict], list[tuple[float, float]]]:
    """Feed the stream to a running manager (``add(i)`` queues request i, ``get_result(timeout)`` takes
    a finished ``GenerationOutput`` or None) at its arrival times; every request's result, the
    lifespans; times count from the stream's start (``time.perf_counter``, the outputs' clock)."""
    _sync(device)
    t0 = time.perf_counter()
    order = sorted(range(len(requests)), key=lambda i: requests[i].arrival_s)
    outputs: dict[str, object] = {}
    for i in order:
        delay = t0 + requests[i].arrival_s - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        add(i)

    def record(i: int) -> dict:
        r, out = requests[i], outputs[f"w{i}"]
        stamps = out.timestamps or []
        if out.error is not None:
            raise RuntimeError(f"request w{i} failed: {out.error}")
        if not stamps:
            raise RuntimeError(f"request w{i} came back without timestamps")
        return {"prompt_len": r.prompt_len, "output_len": r.output_len, "generated": len(out.generated_tokens),
                "ttft_s": stamps[0] - t0 - r.arrival_s, "start_s": out.lifespan[0] - t0,
                "end_s": max(out.lifespan[1], stamps[-1]) - t0, "gaps_s": [b - a for a, b in zip(stamps, stamps[1:])]}

    def finished() -> list[dict]:
        return [{"request": i, **record(i)} for i in range(len(requests)) if f"w{i}" in outputs]

    while len(outputs) < len(requests):
        _over(limit_s, t0, requests, finished)
        result = get_result(_POLL_S)
        if result is None:
            if not alive():
                raise RuntimeError(f"the serving loop stopped with {len(requests) - len(outputs)} requests unserved")
            continue
        if result.is_finished():
            outputs[result.request_id] = result
    per_request = [record(i) for i in range(len(requests))]
    return per_request, [tuple(outputs[f"w{i}"].lifespan) for i in range(len(requests))]


def _cb_attention(model, cb_kwargs: dict) -> dict:
    """transformers' continuous batching switches to flash attention where it finds it, else to its
    paged form of the model's own kernel. Without the flash_attn package, looking for it means a hub
    download of a kernel (none offline): the switch is turned off (``auto_switch_to_flash``, or on
    releases without it, by asking for ``paged|<kernel>`` up front, which it keeps)."""
    import importlib.util

    from transformers import ContinuousBatchingConfig

    if importlib.util.find_spec("flash_attn") is not None:
        return cb_kwargs
    if "auto_switch_to_flash" in getattr(ContinuousBatchingConfig, "__dataclass_fields__", {}):
        return {"auto_switch_to_flash": False, **cb_kwargs}
    if "paged|" not in model.config._attn_implementation:
        model.set_attn_implementation(f"paged|{model.config._attn_implementation}")
    return cb_kwargs


def run_dense_cb(model, requests: list[WorkloadRequest], prompts: list[list[int]],
                 cb_overrides: dict | None = None, limit_s: float | None = None) -> WorkloadRow:
    """transformers' continuous batching of the plain model (its KV cache sized by transformers
    unless ``cb_overrides`` sets ``ContinuousBatchingConfig`` fields, e.g. ``num_blocks`` on a CPU)."""
    from transformers import ContinuousBatchingConfig, GenerationConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    if getattr(model, "_shadowkv", None) is not None:
        raise ValueError("dense-cb runs the plain model: run it before shadowkv_fx.optimize, or restore() the model")
    longest = max(r.prompt_len + r.output_len for r in requests)
    gen_config = GenerationConfig(do_sample=False, eos_token_id=-1, max_new_tokens=max(r.output_len for r in requests))
    hints = WorkloadHints(max_prompt_length=max(r.prompt_len for r in requests),
                          max_generated_length=max(r.output_len for r in requests), num_requests=len(requests))
    original_attn, manager, cut = model.config._attn_implementation, None, True
    row = WorkloadRow("dense-cb", None, len(requests))
    try:
        cb_kwargs = _cb_attention(model, dict(cb_overrides or {}))
        manager = model.init_continuous_batching(generation_config=gen_config, workload_hints=hints,
                                                 continuous_batching_config=ContinuousBatchingConfig(**cb_kwargs))
        manager.warmup()
        row.note = f"transformers continuous batching, {model.config._attn_implementation}"
        cache = getattr(manager.batch_processor, "cache", None)
        blocks, size = getattr(cache, "num_blocks", None), getattr(cache, "block_size", None)
        if blocks and size:
            row.slots = blocks * size // longest
            row.note += f", KV cache of {blocks} blocks x {size} tokens"
        manager.start()

        def add(i):
            manager.add_request(prompts[i], request_id=f"w{i}", max_new_tokens=requests[i].output_len,
                                record_timestamps=True, eos_token_id=-1)

        per_request, spans = _serve(add, lambda timeout: manager.get_result(timeout=timeout), manager.is_running,
                                    requests, model.device, limit_s)
        cut = False
    finally:
        if manager is not None:
            manager.stop(block=True, hard_stop=cut)  # after an error, what is still open is dropped
            manager.destroy()
        if model.config._attn_implementation != original_attn:
            model.set_attn_implementation(original_attn)
    row.max_concurrent = max_overlap(spans)
    return _finish_row(row, per_request)


@contextlib.contextmanager
def _eos_off_quietly():
    """Drops transformers' warning, said per request, that eos -1 never stops a generation (on purpose here)."""
    target = logging.getLogger("transformers.generation.utils")

    def quiet(record: logging.LogRecord) -> bool:
        return "should consist of positive integers" not in record.getMessage()

    target.addFilter(quiet)
    try:
        yield
    finally:
        target.removeFilter(quiet)


def warm_shadowkv_slots(slots, vocab: int, length: int) -> None:
    """Untimed: one short request through ``slots`` (compiles its step, captures its CUDA graph)."""
    from shadowkv_fx.serving import generate_batch

    prompt = torch.randint(3, vocab, (length,), generator=torch.Generator().manual_seed(0)).tolist()
    generate_batch(slots, [prompt], max_new_tokens=3, eos_token_id=-1, do_sample=False, seeds=[0])


def run_shadowkv_cb(model, requests: list[WorkloadRequest], prompts: list[list[int]], slots: int,
                    prefill_chunk: int, warm_length: int, limit_s: float | None = None) -> WorkloadRow:
    """``ServingManager`` over ``ShadowKVSlots`` of ``slots`` rows, sized for the longest request."""
    from shadowkv_fx.serving import ServingManager, ShadowKVSlots

    longest = max(r.prompt_len + r.output_len for r in requests)
    backend = ShadowKVSlots(model, slots, longest, prefill_chunk)
    row = WorkloadRow("shadowkv-cb", slots, len(requests), note=f"ShadowKVSlots, prefill pieces of {prefill_chunk}")
    with _eos_off_quietly():
        warm_shadowkv_slots(backend, model.config.vocab_size, warm_length)
        with ServingManager(backend) as manager:
            def add(i):
                manager.add_request(prompts[i], request_id=f"w{i}", max_new_tokens=requests[i].output_len,
                                    eos_token_id=-1, do_sample=False, record_timestamps=True)

            per_request, spans = _serve(add, lambda timeout: manager.get_result(timeout=timeout),
                                        manager.is_running, requests, model.device, limit_s)
    row.max_concurrent = max_overlap(spans)
    return _finish_row(row, per_request)


class _FirstToken:
    """A ``generate()`` streamer that notes when the first generated token arrives."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:  # the first call hands over the prompt
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def _generate(model, prompts: list[list[int]], new_tokens: int, pad: int, streamer=None) -> torch.Tensor:
    """``generate()`` of the prompts left-padded to the longest; the new tokens ``[B, new_tokens]``."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
    mask = torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]
    with torch.no_grad():
        out = model.generate(ids.to(model.device), attention_mask=mask.long().to(model.device), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad, streamer=streamer)
    return out[:, width:]


def run_shadowkv_static(model, requests: list[WorkloadRequest], prompts: list[list[int]], batch: int,
                        warm_length: int, limit_s: float | None = None) -> WorkloadRow:
    """Static batches of ``batch`` in arrival order, each ``generate()`` to its longest output."""
    order = sorted(range(len(requests)), key=lambda i: requests[i].arrival_s)
    groups = [order[k:k + batch] for k in range(0, len(order), batch)]
    pad = model.generation_config.pad_token_id
    pad = 0 if pad is None or pad < 0 else pad
    warm = torch.randint(3, model.config.vocab_size, (warm_length,), generator=torch.Generator().manual_seed(0)).tolist()
    for size in sorted({len(g) for g in groups}):  # untimed: compile each batch size's decode step
        _generate(model, [warm] * size, 3, pad)
    row = WorkloadRow("shadowkv-static", batch, len(requests), max_concurrent=max(len(g) for g in groups),
                      note=f"generate() in {len(groups)} batch(es), left-padded")
    per_request: dict[int, dict] = {}
    _sync(model.device)
    t0 = time.perf_counter()
    for group in groups:
        _over(limit_s, t0, requests, [{"request": i, **p} for i, p in per_request.items()])
        delay = t0 + max(requests[i].arrival_s for i in group) - time.perf_counter()
        if delay > 0:  # a static batch starts once it is full
            time.sleep(delay)
        new_tokens = max(requests[i].output_len for i in group)
        streamer = _FirstToken()
        out = _generate(model, [prompts[i] for i in group], new_tokens, pad, streamer)
        _sync(model.device)
        end = time.perf_counter() - t0
        produced = int(out.shape[1])  # every row generated this many; each counts its own length
        if produced != new_tokens or streamer.first is None:
            raise RuntimeError(f"generate() of a static batch gave {produced} tokens, not {new_tokens}")
        for i in group:
            r = requests[i]
            per_request[i] = {"prompt_len": r.prompt_len, "output_len": r.output_len,
                              "generated": r.output_len, "end_s": end, "ttft_s": streamer.first - t0 - r.arrival_s}
    return _finish_row(row, [per_request[i] for i in range(len(requests))])


def run_method(label: str, method: str, fn, failed, progress):
    """``fn()``'s row, or ``failed(error)``'s when it raises: one method's failure is its row, and the
    others still run (on a GPU with the last one's cached memory given back first)."""
    from shadowkv_fx import bench

    progress(f"{label}: {method}")
    if torch.cuda.is_available():
        bench._release_memory()
    try:
        row = fn()
    except Exception as exc:  # noqa: BLE001
        row = failed(f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}")
        if isinstance(exc, Overtime):
            row.per_request = exc.finished  # what finished before the limit, each with its times
            for p in row.per_request:
                p.pop("gaps_s", None)
            for name, value in exc.details.items():
                setattr(row, name, value)
    progress(f"{label}: {method} done: {row.error or f'{row.tok_s:.1f} tok/s'}")
    return row


def run_workload(model, requests: list[WorkloadRequest], config, slots: int | None = None,
                 methods: tuple[str, ...] = METHODS, prefill_chunk: int = 4096, optimize=None,
                 cb_overrides: dict | None = None, progress=print, seed: int = 0, on_row=None,
                 limit_s: float | None = None) -> list[WorkloadRow]:
    """Every method of ``methods`` over ``requests`` on ``model``, in ``METHODS``' order: ShadowKV
    first (``optimize(model, config)``, default ``bench.ensure_optimized``, unless it is optimized
    already), then dense on the model ``restore``d (it ends dense). ``slots`` None: one below the
    preflight's largest batch at the longest prompt and output (a GPU), capped at the number of
    requests. A method that fails, or runs past ``limit_s`` seconds, gets a row with its error.
    ``on_row(rows)`` after each method (the CLI writes its files there: a run cut short keeps the
    rows it finished)."""
    import shadowkv_fx
    from shadowkv_fx import bench

    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown workload methods {sorted(unknown)}; known: {METHODS}")
    shadowkv = [m for m in METHODS[:2] if m in methods]
    if slots is None and shadowkv and model.device.type != "cuda":
        raise ValueError("the default slots come from the GPU preflight: give slots on a CPU")
    prompts = make_prompts(requests, model.config.vocab_size, seed)
    warm_length = min(WARM_PROMPT, min(r.prompt_len for r in requests))
    rows = []

    def attempt(method, fn):
        rows.append(run_method("workload", method, fn,
                               lambda error: WorkloadRow(method, slots, len(requests), error=error), progress))
        if on_row is not None:
            on_row(rows)

    if shadowkv:
        if getattr(model, "_shadowkv", None) is None:
            (optimize or bench.ensure_optimized)(model, config)
        if slots is None:
            bench._release_memory()
            # one row fewer than the preflight's static batch: continuous batching prefills each prompt in
            # a batch-1 cache of its own beside the running rows, on the GPU and in pinned host memory
            slots = bench.largest_batch(model, max(r.prompt_len for r in requests), config,
                                        max(r.output_len for r in requests)).largest - 1
        slots = max(1, min(slots, len(requests)))
        progress(f"workload: {slots} slots")
    if "shadowkv-cb" in methods:
        attempt("shadowkv-cb", lambda: run_shadowkv_cb(model, requests, prompts, slots, prefill_chunk, warm_length,
                                                       limit_s))
    if "shadowkv-static" in methods:
        attempt("shadowkv-static", lambda: run_shadowkv_static(model, requests, prompts, slots, warm_length, limit_s))
    if "dense-cb" in methods:
        if getattr(model, "_shadowkv", None) is not None:
            shadowkv_fx.restore(model)
        attempt("dense-cb", lambda: run_dense_cb(model, requests, prompts, cb_overrides, limit_s))
    return rows
