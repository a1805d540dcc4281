"""Prefill seconds per sequence, ShadowKV at batch 1 and at batch B against dense at batch 1, with
the pinned-value pool cold (first cache of that shape) and warm (a second cache of the same shape),
and where a batched prefill's extra time goes (page-locking, host syncs).

    python benchmarks/prefill_batch.py --context 32768 --batch 8 --out OUT

Same model, same process, same prompts; every point after a warm-up that compiled its graphs.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

import shadowkv_fx
from shadowkv_fx import bench, key_basis, pinned
from shadowkv_fx.kernels import compression


class PinTimer:
    """Seconds spent creating page-locked blocks (mmap + cudaHostRegister), by wrapping ``_Block``."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.blocks = 0
        original = pinned._Block.__init__
        timer = self

        def timed(block, size):
            t = time.perf_counter()
            original(block, size)
            timer.seconds += time.perf_counter() - t
            timer.blocks += 1

        pinned._Block.__init__ = timed

    def take(self) -> tuple[float, int]:
        out = (self.seconds, self.blocks)
        self.seconds, self.blocks = 0.0, 0
        return out


def shadowkv_prefill(model, ids: torch.Tensor, config, pins: PinTimer) -> dict:
    cache = shadowkv_fx.ShadowKVCache(model.config.num_hidden_layers, config, tail_capacity=32)
    pins.take()
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.no_grad():
        model(ids, cache=cache, logits_to_keep=1)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    pin_s, blocks = pins.take()
    report = cache.memory_report()
    del cache
    return {"seconds": seconds, "per_seq_s": seconds / len(ids), "pin_s": pin_s, "pin_blocks": blocks,
            "host_gib": report.get("cpu", {}).get("total", 0) / 2**30 if isinstance(report.get("cpu"), dict) else None}


def count_host_syncs(model, ids: torch.Tensor, config) -> dict[str, int]:
    """Synchronising calls on one prefill, by the line that made them (torch's sync debug mode), those of
    another thread than the prefill's (``key_basis``' worker) marked with its name."""
    import threading
    import warnings

    cache = shadowkv_fx.ShadowKVCache(model.config.num_hidden_layers, config, tail_capacity=32)
    caught = []

    def record(message, category, filename, lineno, file=None, line=None):  # runs in the warning's thread
        caught.append((threading.current_thread(), str(message), filename, lineno))

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("always")
            warnings.showwarning = record
            model(ids, cache=cache, logits_to_keep=1)  # its end_step joins the worker: its syncs are in
    finally:
        torch.cuda.set_sync_debug_mode(0)
    where: dict[str, int] = {}
    for thread, message, filename, lineno in caught:
        if "synchroniz" in message:
            origin = "" if thread is threading.main_thread() else f"[{thread.name}] "
            key = f"{origin}{os.path.relpath(filename)}:{lineno}"
            where[key] = where.get(key, 0) + 1
    return where


def profile_prefill(model, ids: torch.Tensor, config, top: int = 25, trace: str | None = None) -> str:
    """Where one prefill's time goes: ops by device time, and by host time (torch.profiler); with ``trace`` (a
    path ending .json.gz) also its timeline, streams apart (whether the key bases' stream overlaps the compute's)."""
    from torch.profiler import ProfilerActivity, profile

    cache = shadowkv_fx.ShadowKVCache(model.config.num_hidden_layers, config, tail_capacity=32)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof, torch.no_grad():
        model(ids, cache=cache, logits_to_keep=1)
        torch.cuda.synchronize()
    if trace:
        prof.export_chrome_trace(trace)
    events = prof.key_averages()
    return (events.table(sort_by="cuda_time_total", row_limit=top) + "\n"
            + events.table(sort_by="self_cpu_time_total", row_limit=top))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--value-hbm-gib", type=float, default=None, help="GiB of values kept on the GPU (0: all pinned)")
    parser.add_argument("--profile", action="store_true",
                        help="also: torch.profiler tables of one batch-1 prefill (and its trace under --out)")
    parser.add_argument("--out")
    args = parser.parse_args()
    model = bench.llama31_8b_random(args.layers)
    config = shadowkv_fx.ShadowKVConfig(sparse_budget=2048, rank=160, value_hbm_gib=args.value_hbm_gib)
    torch.manual_seed(args.context)
    ids = torch.randint(0, model.config.vocab_size - 1, (args.batch, args.context), device="cuda")
    rows = {}
    dense = bench.run_dense(model, ids[:1], 1, compiled=False)  # warms the eager kernels
    dense = bench.run_dense(model, ids[:1], 1, compiled=False)
    rows["dense batch 1"] = {"per_seq_s": dense["prefill_s"]}
    bench.ensure_optimized(model, config)
    pins = PinTimer()
    shadowkv_prefill(model, ids[:1], config, pins)  # compiles the prefill graphs
    rows["shadowkv batch 1"] = shadowkv_prefill(model, ids[:1], config, pins)
    rows[f"shadowkv batch {args.batch}, pool cold"] = shadowkv_prefill(model, ids, config, pins)
    rows[f"shadowkv batch {args.batch}, pool warm"] = shadowkv_prefill(model, ids, config, pins)
    default = compression.EIGEN_SOLVER, key_basis.ON_WORKER["cuda"]
    for solver, on_worker in (("eigh", True), ("eigh", False), ("subspace", True), ("subspace", False)):
        if (solver, on_worker) != default:  # the key bases' other ways, against the rows above
            compression.EIGEN_SOLVER, key_basis.ON_WORKER["cuda"] = solver, on_worker
            where = "worker" if on_worker else "in line"
            rows[f"shadowkv batch 1, {solver}, {where}"] = shadowkv_prefill(model, ids[:1], config, pins)
    compression.EIGEN_SOLVER, key_basis.ON_WORKER["cuda"] = default
    lines = [f"{torch.cuda.get_device_name()}, {args.layers} layers, context {args.context}",
             f"{'point':<38}{'s/seq':>8}{'total s':>9}{'pinning s':>10}{'blocks':>7}"]
    for name, r in rows.items():
        lines.append(f"{name:<38}{r['per_seq_s']:>8.2f}{r.get('seconds', r['per_seq_s']):>9.2f}"
                     f"{r.get('pin_s', 0.0):>10.2f}{r.get('pin_blocks', 0):>7}")
    syncs = count_host_syncs(model, ids[:1], config)
    rows["host syncs of a batch-1 prefill"] = syncs
    lines.append(f"host syncs of one batch-1 prefill: {sum(syncs.values())}")
    lines += [f"  {n:5d}  {where}" for where, n in sorted(syncs.items(), key=lambda kv: -kv[1])[:20]]
    if args.profile:
        trace = os.path.join(args.out, "prefill_trace.json.gz") if args.out else None
        if args.out:
            os.makedirs(args.out, exist_ok=True)
        lines.append(profile_prefill(model, ids[:1], config, trace=trace))
    write_results(args.out, "prefill_batch", rows, "\n".join(lines))


def write_results(out: str | None, stem: str, rows: dict, text: str) -> None:
    """Print ``text``; with ``out``, also write it and ``rows`` there as ``stem``.txt and ``stem``.json."""
    print(text)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"{stem}.json"), "w") as f:
            json.dump(rows, f, indent=1)
        with open(os.path.join(out, f"{stem}.txt"), "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
