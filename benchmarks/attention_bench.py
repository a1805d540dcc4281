"""Decode attention alone: today's cat + grouped SDPA against Triton flash-decoding on one persistent buffer.

Llama-3.1-8B shapes (Hkv=8, G=4, D=128, bf16) with ShadowKV defaults: 48 outlier chunks of 8 tokens,
a 2048-token sparse budget, a 32-token local window and a 64-token generated tail (N = 2528). Run on
a GPU:

    python benchmarks/attention_bench.py --batch 1 4 16
    python benchmarks/attention_bench.py --sweep      # also try other tile/warp/stage settings

GB/s counts the K and V bytes that one step must read (the whole buffer), for both paths. Each path is
timed eagerly (host launch overhead included) and replayed as a CUDA graph, as decode steps run.
"""
from __future__ import annotations

import argparse
import itertools

import torch
import triton
import triton.testing

from shadowkv_fx.kernels import naive, triton_decode_attention as tda
from shadowkv_fx.kernels.grouped_attention import grouped_masked_attention

HKV, GROUP, D = 8, 4, 128
OUTLIERS, SELECTED, LOCAL, TAIL = 48 * 8, 2048, 32, 64


def make_step(batch: int, n: int, fill: int, dtype: torch.dtype):
    """Random per-region tensors as ``LayerState`` holds them, plus the same data as one buffer.

    Returns ``(q, regions, buffer)``: ``regions`` feeds the cat path, ``buffer`` the Triton path.
    """
    gen = torch.Generator(device="cuda").manual_seed(batch)
    rand = lambda *shape: torch.randn(*shape, generator=gen, device="cuda", dtype=dtype)  # noqa: E731
    q = rand(batch, HKV * GROUP, n, D)
    sizes = (OUTLIERS, SELECTED, LOCAL, TAIL)
    ks = [rand(batch, HKV, s, D) for s in sizes]
    vs = [rand(batch, HKV, s, D) for s in sizes]
    # some selected chunks are not real picks (a shorter sequence's padding); everything else is valid
    picked = torch.rand(batch, HKV, SELECTED // 8, generator=gen, device="cuda") < 0.9
    outlier_valid = torch.ones(batch, dtype=torch.bool, device="cuda")
    local_valid = torch.ones(batch, LOCAL, dtype=torch.bool, device="cuda")
    fill_t = torch.tensor(fill, dtype=torch.int64, device="cuda")
    regions = (ks, vs, outlier_valid, picked, local_valid, fill_t)
    prefix_valid = torch.cat([
        outlier_valid[:, None, None].expand(batch, HKV, OUTLIERS),
        picked.repeat_interleave(8, dim=-1),
        local_valid[:, None, :].expand(batch, HKV, LOCAL),
    ], dim=-1).contiguous()
    buffer = (torch.cat(ks, 2), torch.cat(vs, 2), prefix_valid, OUTLIERS + SELECTED + LOCAL, fill_t)
    return q, regions, buffer


def cat_attention(q, regions, scale):
    """What ``LayerState.decode`` does today: concatenate keys, values and masks, then grouped SDPA."""
    ks, vs, outlier_valid, picked, local_valid, fill = regions
    b, _, n, _ = q.shape
    tail_pos = torch.arange(TAIL, device=q.device)
    query_pos = fill - n + torch.arange(n, device=q.device)
    allowed = torch.cat([
        outlier_valid[:, None, None, None].expand(b, HKV, n, OUTLIERS),
        picked.repeat_interleave(8, dim=-1)[:, :, None, :].expand(b, HKV, n, -1),
        local_valid[:, None, None, :].expand(b, HKV, n, -1),
        (tail_pos[None, :] <= query_pos[:, None])[None, None].expand(b, HKV, n, -1),
    ], dim=3)
    return grouped_masked_attention(q, torch.cat(ks, 2), torch.cat(vs, 2), allowed, scale)


def bench(batch: int, n: int, fill: int, dtype: torch.dtype) -> None:
    q, regions, (k_buf, v_buf, valid, tail_start, fill_t) = make_step(batch, n, fill, dtype)
    scale = D ** -0.5
    out = torch.empty(batch, HKV * GROUP, n, D, dtype=dtype, device="cuda")
    triton_fn = lambda: tda.decode_attention(q, k_buf, v_buf, valid, tail_start, fill_t, scale, out=out)  # noqa: E731
    expected = cat_attention(q, regions, scale).float()
    got = triton_fn().float()
    rel = ((got - expected).abs().max() / expected.abs().max()).item()
    exact = naive.decode_attention(q.float(), k_buf.float(), v_buf.float(), valid, tail_start, fill_t, scale)
    rel_fp32 = ((got - exact).abs().max() / exact.abs().max()).item()
    nbytes = k_buf.numel() * k_buf.element_size() + v_buf.numel() * v_buf.element_size()
    splits = tda.choose_splits(batch * HKV, k_buf.shape[2], torch.cuda.get_device_properties(0).multi_processor_count)
    print(f"B={batch:3d} n={n} N={k_buf.shape[2]} splits={splits:2d}  max rel err vs cat+SDPA {rel:.2e}, "
          f"vs fp32 reference {rel_fp32:.2e}")
    for name, fn in (("cat + grouped SDPA", lambda: cat_attention(q, regions, scale)), ("triton", triton_fn)):
        eager = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
        graph = triton.testing.do_bench_cudagraph(fn, rep=300, return_mode="median")
        print(f"    {name:20s} eager {eager:7.4f} ms {nbytes / eager / 1e6:6.0f} GB/s | "
              f"CUDA graph {graph:7.4f} ms {nbytes / graph / 1e6:6.0f} GB/s")


def sweep(batch: int, n: int, fill: int, dtype: torch.dtype) -> None:
    """Triton graph-replay time per (BLOCK_N, num_warps, num_stages): which fixed setting to ship
    (no autotune: its first call would benchmark inside a CUDA-graph capture)."""
    q, _, (k_buf, v_buf, valid, tail_start, fill_t) = make_step(batch, n, fill, dtype)
    out = torch.empty(batch, HKV * GROUP, n, D, dtype=dtype, device="cuda")
    nbytes = 2 * k_buf.numel() * k_buf.element_size()
    defaults = tda.BLOCK_N, tda.NUM_WARPS, tda.NUM_STAGES
    rows = []
    for block_n, warps, stages in itertools.product((32, 64, 128), (2, 4, 8), (2, 3, 4)):
        tda.BLOCK_N, tda.NUM_WARPS, tda.NUM_STAGES = block_n, warps, stages
        fn = lambda: tda.decode_attention(q, k_buf, v_buf, valid, tail_start, fill_t, D ** -0.5, out=out)  # noqa: E731
        try:
            fn()  # compile outside the capture
            ms = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
        except Exception as err:  # noqa: BLE001  (out of shared memory and the like)
            print(f"    BLOCK_N={block_n} warps={warps} stages={stages}: {type(err).__name__}")
            continue
        rows.append((ms, block_n, warps, stages))
    tda.BLOCK_N, tda.NUM_WARPS, tda.NUM_STAGES = defaults
    for ms, block_n, warps, stages in sorted(rows)[:5]:
        print(f"    B={batch:2d} BLOCK_N={block_n:3d} warps={warps} stages={stages}: CUDA graph {ms:7.4f} ms "
              f"{nbytes / ms / 1e6:6.0f} GB/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--new-tokens", type=int, default=1, help="query tokens per step (n)")
    parser.add_argument("--fill", type=int, default=TAIL // 2, help="tail tokens written, the new ones included")
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    for batch in args.batch:
        bench(batch, args.new_tokens, args.fill, torch.bfloat16)
    if args.sweep:
        for batch in args.batch:
            sweep(batch, args.new_tokens, args.fill, torch.bfloat16)


if __name__ == "__main__":
    main()
