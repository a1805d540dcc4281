"""Where a document's prefill in pieces (a serving slot's admission) spends the seconds that one
piece does not: the attention kernels alone (SDPA over the whole causal prompt against the same
prompt a piece at a time, each later piece under a lower-right causal bias or as the prefill runs it,
``prefill_attention.later_piece``), then both prefills under the profiler.

    python benchmarks/prefill_profile.py --context 122880 --piece 32768 --out OUT

Same model (Llama-3.1-8B shape, random bf16 weights), 8-bit values and landmarks offloaded to
pinned host memory; every prefill timed is the second of its kind, after a sync, the first's cache freed.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import time

import torch
from torch.nn.attention.bias import causal_lower_right

import shadowkv_fx
from shadowkv_fx import bench
from shadowkv_fx.prefill_attention import later_piece

sys.path.insert(0, os.path.dirname(__file__))
from question_step import prefill  # noqa: E402  (a sibling script)


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def attention_seconds(context: int, piece: int, heads: int = 32, head_dim: int = 128) -> dict[str, float]:
    """One layer's prefill attention: the whole prompt causal, and the same a piece at a time."""
    q, k, v = (torch.randn(1, heads, context, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def pieces(later):
        for start in range(0, context, piece):
            end = min(context, start + piece)
            if start == 0:
                sdpa(q[:, :, :end], k[:, :, :end], v[:, :, :end], is_causal=True)
            else:
                later(q[:, :, start:end], k[:, :, :end], v[:, :, :end])

    def lower_right(qp, kp, vp):
        return sdpa(qp, kp, vp, attn_mask=causal_lower_right(qp.shape[2], kp.shape[2]))

    def split(qp, kp, vp):
        return later_piece(qp, kp, vp, head_dim**-0.5)

    rows = {}
    for name, fn in (("whole", lambda: sdpa(q, k, v, is_causal=True)),
                     (f"pieces of {piece}, lower-right bias", lambda: pieces(lower_right)),
                     (f"pieces of {piece}, prefill_attention.later_piece", lambda: pieces(split))):
        timed(fn)
        rows[name] = timed(fn)
    return rows


def profiled_prefill(model, config, ids, piece: int | None, profile: bool) -> tuple[float, str]:
    cache = shadowkv_fx.ShadowKVCache(model.config.num_hidden_layers, config, prefill_chunk_size=piece)

    def run():
        prefill(model, cache, ids, piece)

    if not profile:
        seconds = timed(run)
        return seconds, ""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        seconds = timed(run)
    averages = prof.key_averages()
    tables = [averages.table(sort_by=key, row_limit=18, max_name_column_width=70)
              for key in ("cuda_time_total", "self_cpu_time_total")]
    return seconds, "\n".join(tables)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=122880)
    parser.add_argument("--piece", type=int, default=32768)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--out", default="prefill_profile")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    lines = [f"{name}: {s:.3f} s" for name, s in attention_seconds(args.context, args.piece).items()]
    print("attention of one layer, 32 heads:", "; ".join(lines), flush=True)
    model = bench.llama31_8b_random(args.layers, "cuda")
    config = dataclasses.replace(shadowkv_fx.ShadowKVConfig(), value_bits=8, landmark_bits=8, value_hbm_gib=0)
    bench.ensure_optimized(model, config)
    ids = torch.randint(3, model.config.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(0))
    ids = ids.cuda()
    for piece in (None, args.piece):
        name = "one piece" if piece is None else f"pieces of {piece}"
        first, _ = profiled_prefill(model, config, ids, piece, profile=False)
        gc.collect()
        second, _ = profiled_prefill(model, config, ids, piece, profile=False)
        gc.collect()
        profiled, tables = profiled_prefill(model, config, ids, piece, profile=True)
        gc.collect()
        lines.append(f"prefill {name}: {first:.2f} s, then {second:.2f} s, under the profiler {profiled:.2f} s")
        print(lines[-1], flush=True)
        with open(os.path.join(args.out, f"profile_{'whole' if piece is None else piece}.txt"), "w") as f:
            f.write(tables)
        print(tables[:6000], flush=True)
    with open(os.path.join(args.out, "summary.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
