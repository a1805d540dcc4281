"""``bench --breakdown``: where one ShadowKV decode step spends its GPU time, and steps timed one by one."""
from __future__ import annotations

import time
from typing import Callable

import torch


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1:].argmax(-1)


def breakdown(fn: Callable[[], None], top: int = 15) -> list[tuple[str, float]]:
    """GPU kernel time (ms) per kernel name over one call of ``fn``, largest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    rows = [(e.key[:70], e.device_time_total / 1e3) for e in prof.key_averages() if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])[:top] + [("(all kernels of the step)", sum(ms for _, ms in rows))]


def steps_alone(model, cache, token: torch.Tensor, steps: int) -> dict:
    """``steps`` more decode steps, each timed alone (synchronized): the median step that folds
    nothing, the mean step that folds (``fold.py`` runs eagerly before the captured step), and
    where the host spends one folding step (self CPU time per op, largest first)."""
    from torch.profiler import ProfilerActivity, profile

    from shadowkv_fx import fold

    plain, folding, host_ops = [], [], []
    state = cache.layers[0].state
    with torch.no_grad():
        for _ in range(steps):
            folds = state.compressed and state.folds and any(fold.chunks_due(state))
            sync()
            t0 = time.perf_counter()
            if folds and not host_ops:
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    token = greedy(model(token, cache=cache).logits)
                    sync()
                host_ops = [(e.key[:60], e.self_cpu_time_total / 1e3, e.count)
                            for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]]
                continue
            token = greedy(model(token, cache=cache).logits)
            sync()
            (folding if folds else plain).append(1e3 * (time.perf_counter() - t0))
    plain.sort()
    return {"steps": steps, "median_ms": plain[len(plain) // 2] if plain else None,
            "folding_steps": len(folding) + bool(host_ops),
            "folding_mean_ms": sum(folding) / len(folding) if folding else None, "folding_host_ops": host_ops}
