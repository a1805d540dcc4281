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

import inspect
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from shadowkv_fx import compat

METHODS = ("dense-eager", "dense-compiled", "shadowkv")


@dataclass
class BenchRow:
    method: str
    context: int
    batch: int
    tok_s: float | None = None
    step_ms: float | None = None
    prefill_s: float | None = None
    gpu_gib_per_seq: float | None = None
    host_gib_per_seq: float | None = None
    v_on_gpu: float | None = None
    v_hit_rate: float | None = None
    peak_gib: float | None = None
    error: str | None = None
    breakdown: list = field(default_factory=list)


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
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg, device=device)
    return model.eval()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


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


def _greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1:].argmax(-1)


def run_dense(model, ids: torch.Tensor, steps: int, compiled: bool) -> dict:
    from transformers import DynamicCache, StaticCache

    batch, context = ids.shape
    if compiled:
        cache = StaticCache(config=model.config, max_cache_len=context + steps + 8)
        forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    else:
        cache, forward = DynamicCache(config=model.config), model.forward
    position = [context]

    def prefill():
        with torch.no_grad():
            out = model(ids, **{compat.CACHE_ARG: cache}, use_cache=True, logits_to_keep=1)
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
            "gpu_gib_per_seq": kv / batch / 2**30, "host_gib_per_seq": 0.0, "v_on_gpu": 1.0}


def run_shadowkv(model, ids: torch.Tensor, steps: int, config) -> dict:
    import shadowkv_fx
    from shadowkv_fx.backend import inductor_graph

    batch = ids.shape[0]
    if getattr(model, "_shadowkv", None) is None:
        shadowkv_fx.optimize(model, config, compile_graph=inductor_graph, cuda_graphs=True)
    with torch.no_grad():  # compile this prompt shape's graphs, so the timed prefill is warm
        model(ids, cache=shadowkv_fx.ShadowKVCache(model.config.num_hidden_layers, config), logits_to_keep=1)
    cache = shadowkv_fx.ShadowKVCache(model.config.num_hidden_layers, config, tail_capacity=steps + 16)

    def prefill():
        with torch.no_grad():
            return _greedy(model(ids, cache=cache, logits_to_keep=1).logits)

    def step(token):
        with torch.no_grad():
            return _greedy(model(token, cache=cache).logits)

    prefill_s, per_step = timed_decode(step, prefill, steps)
    report = cache.memory_report()
    gpu, host = sum(report["gpu"].values()), sum(report["cpu"].values())
    device_v, host_v = report["gpu"].get("device_V", 0), report["cpu"].get("offloaded_V", 0)
    return {"prefill_s": prefill_s, "step_ms": 1e3 * per_step, "tok_s": batch / per_step,
            "gpu_gib_per_seq": gpu / batch / 2**30, "host_gib_per_seq": host / batch / 2**30,
            "v_on_gpu": device_v / max(1, device_v + host_v), "v_hit_rate": cache.value_hit_rate(), "_cache": cache}


def breakdown(fn: Callable[[], None], top: int = 15) -> list[tuple[str, float]]:
    """GPU kernel time (ms) per kernel name over one call of ``fn``, largest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        _sync()
    rows = [(e.key[:70], e.device_time_total / 1e3) for e in prof.key_averages() if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])[:top]


def bench(model, contexts: list[int], batches: list[int], methods: list[str], steps: int, config,
          progress: Callable[[str], None] = print, with_breakdown: bool = False) -> list[BenchRow]:
    rows = []
    for context in contexts:
        for batch in batches:
            ids = torch.randint(0, model.config.vocab_size - 1, (batch, context), device=model.device)
            for method in methods:
                progress(f"{method}: context {context}, batch {batch}")
                row = BenchRow(method, context, batch)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                try:
                    if method == "shadowkv":
                        result = run_shadowkv(model, ids, steps, config)
                        cache = result.pop("_cache")
                        if with_breakdown:
                            token = ids[:, -1:]
                            row.breakdown = breakdown(lambda: model(token, cache=cache))
                        del cache
                    else:
                        result = run_dense(model, ids, steps, compiled=method == "dense-compiled")
                    for key, value in result.items():
                        setattr(row, key, value)
                except torch.OutOfMemoryError as exc:
                    row.error = f"out of memory: {str(exc).splitlines()[0][:100]}"
                row.peak_gib = torch.cuda.max_memory_allocated() / 2**30
                rows.append(row)
                progress(json.dumps({k: v for k, v in asdict(row).items() if k != "breakdown"}))
    return rows


def table(rows: list[BenchRow]) -> str:
    head = (f"{'method':<16}{'context':>8}{'batch':>6}{'tok/s':>9}{'ms/step':>9}{'prefill s':>10}"
            f"{'GPU GiB/seq':>12}{'host GiB/seq':>13}{'V on GPU':>9}{'V hits':>8}{'peak GiB':>9}")
    lines = [head]
    for r in rows:
        if r.error:
            lines.append(f"{r.method:<16}{r.context:>8}{r.batch:>6}  {r.error}")
            continue
        lines.append(f"{r.method:<16}{r.context:>8}{r.batch:>6}{r.tok_s:>9.1f}{r.step_ms:>9.2f}{r.prefill_s:>10.2f}"
                     f"{r.gpu_gib_per_seq:>12.3f}{r.host_gib_per_seq:>13.3f}{r.v_on_gpu:>9.0%}"
                     f"{'-' if r.v_hit_rate is None else f'{r.v_hit_rate:.0%}':>8}{r.peak_gib:>9.1f}")
    for r in rows:
        if r.breakdown:
            lines.append(f"\nbreakdown of one ShadowKV decode step (no CUDA graph), context {r.context}, batch {r.batch}:")
            lines += [f"  {ms:8.3f} ms  {name}" for name, ms in r.breakdown]
    return "\n".join(lines)


def plot(rows: list[BenchRow], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (method, context) in sorted({(r.method, r.context) for r in rows}):
        points = sorted((r.batch, r.tok_s) for r in rows if r.method == method and r.context == context and r.tok_s)
        if points:
            ax.plot(*zip(*points), marker="o", label=f"{method} {context // 1024}K")
    ax.set_xlabel("batch")
    ax.set_ylabel("decode tokens/s")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
