"""``shadowkv-fx bench``: decode throughput of ShadowKV against dense, same model, same run.

Methods, each at the same prompts:
- ``dense-eager``: Hugging Face as most users run it (sdpa, ``DynamicCache``).
- ``dense-compiled``: the fastest dense a HF user gets, ``StaticCache`` + ``torch.compile``
  ``mode="reduce-overhead"`` decode (prefill eager, into the static cache).
- ``shadowkv``: ``optimize(model, compile_graph=inductor, cuda_graphs=True)``, what
  ``torch.compile(model, backend="shadowkv", mode="reduce-overhead")`` runs.
The model is Llama-3.1-8B-shaped with random bf16 weights unless ``--model DIR`` names one.
"""
from __future__ import annotations

import gc
import inspect
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from shadowkv_fx import bench_profile, compat
from shadowkv_fx.bench_profile import greedy as _greedy
from shadowkv_fx.bench_profile import sync as _sync
from shadowkv_fx.cache import device_and_host_bytes
from shadowkv_fx.random_fill import FillAbove, fill_random, fill_replicated

METHODS = ("dense-eager", "dense-compiled", "shadowkv")
DENSE_BOUND = "GPU memory (KV cache + prefill activations)"  # what limits a dense method's batch


@dataclass
class BenchRow:
    method: str
    context: int
    batch: int
    steps: int = 0  # decode steps timed (their mean is step_ms)
    tok_s: float | None = None
    step_ms: float | None = None
    prefill_s: float | None = None
    gpu_gib_per_seq: float | None = None
    state_gib_per_seq: float | None = None  # ShadowKV: GPU bytes without the values kept in spare HBM
    host_gib_per_seq: float | None = None
    v_on_gpu: float | None = None
    v_hit_rate: float | None = None
    peak_gib: float | None = None
    cuda_graph: bool | None = None  # ShadowKV: its decode steps replayed a captured graph
    fill: str = "prefill"  # "random" / "replicate": by fill_random / fill_replicated (no batch prefill time)
    largest_batch: int | None = None  # the largest batch of this method at this context that fits
    bound: str | None = None  # what limits that batch
    best: str | None = None  # --batches best: this row is the fastest batch found, and what bounds it
    error: str | None = None
    breakdown: list = field(default_factory=list)
    steps_alone: dict | None = None  # --breakdown: steps timed one by one, folding steps apart


def llama31_8b_random(layers: int = 32, device: str = "cuda"):
    """Llama-3.1-8B shapes with random bf16 weights (nothing to download)."""
    import transformers as T

    cfg = T.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    )
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = T.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    with torch.device(device):  # its inverse frequencies were left on the meta device
        model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
    return model.eval()


def load_model(path):
    """A saved model in bf16 on this process's GPU; under ``torchrun`` sharded by
    ``tp_plan="auto"`` (each rank holds its share of the heads, ShadowKV state included)."""
    import os

    from transformers import AutoModelForCausalLM

    if world_size() > 1:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, tp_plan="auto").eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda").eval()


def world_size() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def is_lead_rank() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


ALONE_STEPS = 64  # --breakdown: steps timed one by one after the timed ones


def tail_capacity(steps: int, alone: bool) -> int:
    """Generated tokens a ShadowKV point's cache is sized for: warmup, timed and (with ``alone``,
    under ``--breakdown``) alone-timed steps, as ``generate`` sizes it from ``max_new_tokens``: no
    buffer regrows mid-run, and no preallocation beyond what the run generates counts against it."""
    return steps + (ALONE_STEPS if alone else 0) + 16


def timed_decode(step: Callable, prefill: Callable, steps: int, warmup: int = 3) -> tuple[float, float]:
    """``(prefill seconds, seconds per decode step)``: ``prefill()`` returns the first token."""
    _sync()
    t0 = time.perf_counter()
    token = prefill()
    _sync()
    prefill_s = time.perf_counter() - t0
    for i in range(warmup + steps):
        if i == warmup:
            _sync()
            t0 = time.perf_counter()
        token = step(token)
    _sync()
    return prefill_s, (time.perf_counter() - t0) / steps


def run_dense(model, ids: torch.Tensor, steps: int, compiled: bool) -> dict:
    from transformers import DynamicCache, StaticCache

    batch, context = ids.shape
    resident = torch.cuda.memory_allocated()  # weights: what a point's peak is measured above
    # the model's own forward, also once an earlier point of the run optimized it for ShadowKV
    runtime = getattr(model, "_shadowkv", None)
    dense_forward = runtime.original_forward if runtime is not None else model.forward
    if compiled:
        cache = StaticCache(config=model.config, max_cache_len=context + steps + 8)
        forward = torch.compile(dense_forward, mode="reduce-overhead", fullgraph=True)
    else:
        cache, forward = DynamicCache(config=model.config), dense_forward
    position = [context]

    def prefill():
        with torch.no_grad():
            out = dense_forward(ids, **{compat.CACHE_ARG: cache}, use_cache=True, logits_to_keep=1)
        return _greedy(out.logits)

    takes_cache_position = "cache_position" in inspect.signature(model.forward).parameters

    def step(token):
        with torch.no_grad():
            pos = torch.full((batch, 1), position[0], device=ids.device, dtype=torch.long)
            extra = {"cache_position": pos[0]} if takes_cache_position else {}
            out = forward(token, **{compat.CACHE_ARG: cache}, use_cache=True, position_ids=pos, **extra)
        position[0] += 1
        return _greedy(out.logits).clone()

    prefill_s, per_step = timed_decode(step, prefill, steps)
    kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return {"prefill_s": prefill_s, "step_ms": 1e3 * per_step, "tok_s": batch / per_step,
            "gpu_gib_per_seq": kv / batch / 2**30, "host_gib_per_seq": 0.0, "v_on_gpu": 1.0,
            "_peak_per_seq": (torch.cuda.max_memory_allocated() - resident) / batch}


REGIONAL = True  # `bench --whole-graph`: compile the whole forward, not one decoder layer for all


def ensure_optimized(model, config) -> None:
    """ShadowKV as ``torch.compile(model, backend="shadowkv", mode="reduce-overhead")`` runs it, once."""
    import shadowkv_fx
    from shadowkv_fx.backend import inductor_graph

    if getattr(model, "_shadowkv", None) is None:
        shadowkv_fx.optimize(model, config, compile_graph=inductor_graph, cuda_graphs=True, regional=REGIONAL)


def run_shadowkv(model, ids: torch.Tensor, steps: int, config, fill: str = "prefill", alone: bool = True) -> dict:
    """``fill``: "prefill" (``ids`` through the model), "random" (``fill_random``) or "replicate"
    (``fill_replicated`` of ``ids``' first row); a batch's prefill time is reported for "prefill" only.
    ``alone``: the cache also has room for the steps ``steps_alone`` times."""
    import shadowkv_fx
    from shadowkv_fx.cuda_graph import DecodeGraph

    batch, context = ids.shape
    ensure_optimized(model, config)
    if fill == "prefill":  # a replicated fill's one prefill is not timed: it warms nothing first
        # compile this prompt shape's graphs, so the timed prefill is warm: the batch goes through
        # the model ``prefill_rows`` sequences at a time, so that many compile every graph it runs
        warm = ids[: config.prefill_rows or len(ids)]
        with torch.no_grad():
            model(warm, cache=shadowkv_fx.ShadowKVCache(model.config.num_hidden_layers, config), logits_to_keep=1)
    cache = shadowkv_fx.ShadowKVCache(model.config.num_hidden_layers, config, tail_capacity=tail_capacity(steps, alone))

    def prefill():
        with torch.no_grad():
            if fill == "random":
                fill_random(model, cache, batch, context)
                return ids[:, -1:]
            if fill == "replicate":
                return fill_replicated(model, cache, ids[:1], batch)
            return _greedy(model(ids, cache=cache, logits_to_keep=1).logits)

    def step(token):
        with torch.no_grad():
            return _greedy(model(token, cache=cache).logits)

    prefill_s, per_step = timed_decode(step, prefill, steps)
    prefill_s = prefill_s if fill == "prefill" else None
    report = cache.memory_report()
    gpu, host = device_and_host_bytes(report)
    device_v, host_v = report.get("cuda", {}).get("device_V", 0), host
    return {"prefill_s": prefill_s, "step_ms": 1e3 * per_step, "tok_s": batch / per_step,
            "gpu_gib_per_seq": gpu / batch / 2**30, "state_gib_per_seq": (gpu - device_v) / batch / 2**30,
            "host_gib_per_seq": host / batch / 2**30, "v_on_gpu": device_v / max(1, device_v + host_v), "v_hit_rate": cache.value_hit_rate(), "_cache": cache,
            "cuda_graph": any(isinstance(g, DecodeGraph) for g in cache.decode_graphs.values())}


def _release_memory() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    empty_host = getattr(torch._C, "_host_emptyCache", None)
    if empty_host is not None:  # pinned blocks of the last point: the next batch needs other sizes
        empty_host()


def largest_batch(model, context: int, config, tail_capacity: int):
    """ShadowKV's preflight for ``context``-token prompts: ``preflight.Capacity``."""
    from shadowkv_fx.prompt_layout import PromptLayout
    from shadowkv_fx.preflight import capacity

    layout = PromptLayout.from_mask(torch.ones(1, context, dtype=torch.bool), config)
    return capacity(model.config, layout, config, next(model.parameters()).dtype, model.device, tail_capacity,
                    getattr(model, "_tp_size", None) or 1)


def dense_largest_batch(per_seq_peak: float, margin: float = 2**30) -> int:
    """Dense's largest batch on this GPU: its peak grows by ``per_seq_peak`` bytes per sequence
    (KV cache plus the whole-batch prefill's activations, measured at a smaller batch of the same
    run), and the free memory above the weights must hold it."""
    _release_memory()
    free, _ = torch.cuda.mem_get_info()
    return max(1, int((free - margin) // per_seq_peak))


def _measure_dense_peak(model, context: int, steps: int, method: str) -> float:
    """Per-sequence peak bytes of ``method`` at ``context``: one sequence, a few steps."""
    ids = torch.randint(0, model.config.vocab_size - 1, (1, context), device=model.device)
    _release_memory()
    torch.cuda.reset_peak_memory_stats()
    return run_dense(model, ids, min(steps, 2), compiled=method == "dense-compiled")["_peak_per_seq"]


def _run_point(model, method: str, ids: torch.Tensor, steps: int, config, with_breakdown: bool,
               fill: FillAbove, dense_peaks: dict, measured: bool) -> BenchRow:
    """One method at ``ids``' batch and context. ``measured``: a given batch, whose per-sequence
    peak then sizes that dense method's largest batch."""
    batch, context = ids.shape
    row, result = BenchRow(method, context, batch, steps), None
    _release_memory()
    torch.cuda.reset_peak_memory_stats()
    try:
        if method == "shadowkv":
            ensure_optimized(model, config)
            fit = largest_batch(model, context, config, tail_capacity(steps, with_breakdown))
            row.largest_batch, row.bound = fit.largest, fit.bound
            row.fill = fill.for_batch(batch)
            result = run_shadowkv(model, ids, steps, config, row.fill, with_breakdown)
            cache = result.pop("_cache")
            if with_breakdown:
                token = ids[:, -1:]
                row.breakdown = bench_profile.breakdown(lambda: model(token, cache=cache))
                row.steps_alone = bench_profile.steps_alone(model, cache, token, ALONE_STEPS)
            del cache
        else:
            result = run_dense(model, ids, steps, compiled=method == "dense-compiled")
            peak = result.pop("_peak_per_seq")
            if measured:
                dense_peaks[(method, context)] = max(peak, dense_peaks.get((method, context), 0.0))
            row.largest_batch = dense_largest_batch(dense_peaks.get((method, context), peak))
            row.bound = DENSE_BOUND
        for key, value in result.items():
            setattr(row, key, value)
    except (torch.OutOfMemoryError, MemoryError) as exc:
        row.error = f"out of memory: {str(exc).splitlines()[0][:160]}"
    row.peak_gib = torch.cuda.max_memory_allocated() / 2**30
    return row


def _largest(model, method: str, context: int, steps: int, config, with_breakdown: bool,
             dense_peaks: dict) -> tuple[int, str]:
    """The method's largest batch at ``context`` and what bounds it: ShadowKV's by its preflight
    (after optimizing: its workspace counts against the room), dense's from its per-sequence peak
    (``dense_peaks``, measured by a one-sequence probe where no smaller batch of the run was)."""
    if method == "shadowkv":
        ensure_optimized(model, config)
        _release_memory()
        fit = largest_batch(model, context, config, tail_capacity(steps, with_breakdown))
        return fit.largest, fit.bound
    if (method, context) not in dense_peaks:
        dense_peaks[(method, context)] = _measure_dense_peak(model, context, steps, method)
    return dense_largest_batch(dense_peaks[(method, context)]), DENSE_BOUND


def _point(model, method: str, context: int, batch: int, steps: int, config, with_breakdown: bool,
           fill: FillAbove, dense_peaks: dict, measured: bool, progress: Callable[[str], None],
           note: str = "") -> BenchRow:
    """One bench point on the run's prompts for ``context`` (every method and batch draws the same), logged."""
    torch.manual_seed(context)
    ids = torch.randint(0, model.config.vocab_size - 1, (batch, context), device=model.device)
    progress(f"{method}: context {context}, batch {batch}{note}")
    row = _run_point(model, method, ids, steps, config, with_breakdown, fill, dense_peaks, measured)
    progress(json.dumps({k: v for k, v in asdict(row).items() if k != "breakdown"}))
    return row


def _fastest_batch(model, method: str, context: int, steps: int, config, with_breakdown: bool,
                   fill: FillAbove, dense_peaks: dict, progress: Callable[[str], None]) -> list[BenchRow]:
    """``--batches best``: ``batch_search.search`` up to the method's largest batch; the fastest row
    says what bounds it (``best``). Where the search's points skipped the prefill (``fill``), the
    fastest batch is measured once more with a real one (its prefill time, a real prompt per row)."""
    from shadowkv_fx import batch_search

    largest, bound = _largest(model, method, context, steps, config, with_breakdown, dense_peaks)

    def measure(batch: int) -> BenchRow:
        return _point(model, method, context, batch, steps, config, with_breakdown, fill, dense_peaks,
                      False, progress, f" (searching the fastest, largest {largest})")

    best, rows = batch_search.search(measure, largest)
    if best is not None:
        best.best = batch_search.verdict(best, rows, largest, bound)
        if best.fill != "prefill":
            rows.append(_point(model, method, context, best.batch, steps, config, with_breakdown, FillAbove(),
                               dense_peaks, False, progress, " (the fastest found, with a real prefill)"))
    return sorted(rows, key=lambda r: (r.batch, r.fill != "prefill"))


def bench(model, contexts: list[int], batches: list[int | str], methods: list[str], steps: int, config,
          progress: Callable[[str], None] = print, with_breakdown: bool = False,
          random_fill_above: int | None = None, dense_retries: int = 3, fill: str = "random") -> list[BenchRow]:
    """Every method at every (context, batch). Batch ``"best"``: the fastest batch of each method
    (``_fastest_batch``). Batch ``"max"`` runs each method at its own
    largest batch at that context: ShadowKV's by its preflight; dense's from its per-sequence
    peak memory at the largest smaller batch the run measured (else a one-sequence probe), one
    smaller each time it runs out of memory (``dense_retries`` times at most).
    ShadowKV points with a batch above ``random_fill_above`` fill the cache without a prefill per
    sequence: ``fill`` "random" from random K/V (``fill_random``), "replicate" from one real
    prefill of the first prompt compressed into every row (``fill_replicated``)."""
    fill_above = FillAbove(random_fill_above, fill)
    rows = []
    dense_peaks: dict[tuple[str, int], float] = {}  # (method, context) -> per-sequence peak bytes
    for context in contexts:
        for batch_spec in batches:
            for method in methods:
                batch, retries = batch_spec, 0
                if batch_spec == "best":
                    rows += _fastest_batch(model, method, context, steps, config, with_breakdown, fill_above,
                                           dense_peaks, progress)
                    continue
                if batch_spec == "max":
                    batch = _largest(model, method, context, steps, config, with_breakdown, dense_peaks)[0]
                    retries = 0 if method == "shadowkv" else dense_retries
                while True:
                    row = _point(model, method, context, batch, steps, config, with_breakdown, fill_above,
                                 dense_peaks, batch_spec != "max", progress, " (its largest)" if batch_spec == "max" else "")
                    rows.append(row)
                    if not (row.error and retries and batch > 1):
                        break
                    retries, batch = retries - 1, batch - 1
    return rows
