"""Decode-step kernels, reference (plain PyTorch) vs Triton, at Llama-3.1-8B shapes on one GPU.

Per layer and decode step: chunk scoring (``score_chunks``: landmarks against the new query),
choosing the top-k chunks (``top_chunks``, against ``torch.topk`` + ``isfinite`` as the step ran it)
and rebuilding the chosen chunks' keys with RoPE (``rebuild_rope_keys``). Each Triton result is
checked against the reference (max error relative to the largest reference magnitude; for top-k,
0 when the picked scores equal torch.topk's and inf otherwise) before timing.
Times are ``triton.testing.do_bench`` medians (eager launches: Python and launch overhead included)
and, in the "graph" columns, GPU time alone: calls replayed from a CUDA graph (as a decode step
under ``mode="reduce-overhead"`` runs), each after an L2 flush, less the flushes' own time. GB/s (from the graph time) counts the bytes each kernel must move:
landmarks read (scoring); scores read (top-k); U rows + SV read and keys written (rebuild), and,
in a second column, also the cos/sin rows the rebuild reads.

    python benchmarks/kernel_bench.py                       # 32K and 122K contexts, batch 4 and 16
    python benchmarks/kernel_bench.py --contexts 32768 --batches 1 4
    python benchmarks/kernel_bench.py --sweep-topk          # also top-k graph times per warp count
"""
from __future__ import annotations

import argparse
import statistics

import torch
from triton.testing import do_bench

from shadowkv_fx.kernels import naive, triton_rebuild, triton_score, triton_topk

HKV, G, D, RANK, L, K = 8, 4, 128, 160, 8, 256  # Llama-3.1-8B heads, ShadowKV rank / chunk size / budget


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    finite = torch.isfinite(expected)
    if not torch.equal(finite, torch.isfinite(actual)):
        return float("inf")
    diff = (actual.float() - expected.float())[finite].abs().max()
    return (diff / expected.float()[finite].abs().max()).item()


def graph_ms(fn, calls: int = 20, reps: int = 10) -> float:
    """Median GPU time of ``fn`` replayed from a CUDA graph, with a cold L2 as at decode.

    ``do_bench_cudagraph`` replays back to back without a flush: a 33 MB landmark set would then
    sit in the 50 MB L2 and the bandwidth would read high.
    """
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as graph capture asks
        fn()
    torch.cuda.current_stream().wait_stream(side)

    def per_call(body) -> float:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                body()
        graph.replay()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times) / calls

    return per_call(lambda: (flush.zero_(), fn())) - per_call(flush.zero_)


def timings(ref_fn, triton_fn) -> dict:
    out = {}
    for name, fn in (("ref", ref_fn), ("triton", triton_fn)):
        out[f"{name}_ms"] = do_bench(fn, return_mode="median")
        out[f"{name}_graph_ms"] = graph_ms(fn)
    return out


def bench_score(batch: int, chunks: int, gen: torch.Generator) -> dict:
    q = torch.randn(batch, HKV * G, 1, D, device="cuda", generator=gen).bfloat16()
    landmarks = torch.randn(batch, HKV, chunks, D, device="cuda", generator=gen).bfloat16()
    selectable = torch.rand(batch, HKV, chunks, device="cuda", generator=gen) > 0.01
    scale = D ** -0.5
    err = rel_err(triton_score.score_chunks(q, landmarks, selectable, scale),
                  naive.score_chunks(q, landmarks, selectable, scale))
    times = timings(lambda: naive.score_chunks(q, landmarks, selectable, scale),
                    lambda: triton_score.score_chunks(q, landmarks, selectable, scale))
    moved = landmarks.numel() * landmarks.element_size()
    return {**times, "err": err, "bytes": moved, "bytes_all": moved}


def topk_scores(batch: int, chunks: int, gen: torch.Generator) -> torch.Tensor:
    """Scores shaped like ``score_chunks``'s: softmax mass over chunks, outliers/padding ``-inf``."""
    logits = torch.randn(batch, HKV, chunks, device="cuda", generator=gen) * 3
    unselectable = torch.rand(batch, HKV, chunks, device="cuda", generator=gen) < 0.01
    return logits.softmax(dim=-1).masked_fill(unselectable, float("-inf"))


def topk_err(scores: torch.Tensor, k: int = K, **tiles) -> float:
    idx, picked = triton_topk.top_chunks(scores, k, **tiles)
    got = scores.gather(-1, idx).sort(dim=-1, descending=True).values
    same = torch.equal(got, scores.topk(k, dim=-1).values) and torch.equal(picked, torch.isfinite(scores.gather(-1, idx)))
    return 0.0 if same else float("inf")


def bench_topk(batch: int, chunks: int, gen: torch.Generator) -> dict:
    scores = topk_scores(batch, chunks, gen)

    def torch_topk():
        top = torch.topk(scores, K, dim=-1)
        return top.indices, torch.isfinite(top.values)

    times = timings(torch_topk, lambda: triton_topk.top_chunks(scores, K))
    moved = scores.numel() * scores.element_size()
    return {**times, "err": topk_err(scores), "bytes": moved, "bytes_all": moved}


def sweep_topk(batch: int, chunks: int, gen: torch.Generator) -> list[str]:
    """Graph time at each warp count (``GPU_TILES``' warps), then at each segment count a row (``segments``; "auto":
    ``triton_topk.auto_segments``), at chunks of 8 and, twice the chunks and k, of 4 (the same context and budget)."""
    lines = []
    for chunks_, k in ((chunks, K), (2 * chunks, 2 * K)):
        scores = topk_scores(batch, chunks_, gen)
        warps = ({"num_warps": w} for w in (4, 8, 16, 32)) if k == K else ()
        for tiles in (*warps, *({"segments": s} for s in (1, 2, 4, 8, 16, 32, "auto"))):
            err = topk_err(scores, k, **tiles)
            ms = graph_ms(lambda: triton_topk.top_chunks(scores, k, **tiles))
            name = ", ".join(f"{key}={value:>2}" for key, value in tiles.items())
            lines.append(f"  topk sweep B={batch} chunks={chunks_} k={k} {name}: {ms * 1e3:7.1f} us  err {err:.0e}")
    return lines


def rebuild_then_rope(u, sv, chunk_idx, pad, cos, sin) -> torch.Tensor:
    """What ``LayerState.sparse_keys_values`` runs for the keys: rebuild, gather tables, model RoPE (bf16)."""
    token_idx = (chunk_idx[..., None] * L + torch.arange(L, device=chunk_idx.device)).flatten(-2)
    k_pre = naive.rebuild_keys(u, sv, token_idx)
    positions = (token_idx + pad[:, None, None]).clamp(max=cos.shape[2] - 1)
    c, s = naive.gather_positions(cos, positions), naive.gather_positions(sin, positions)
    return k_pre * c + torch.cat([-k_pre[..., D // 2 :], k_pre[..., : D // 2]], dim=-1) * s


def bench_rebuild(batch: int, chunks: int, gen: torch.Generator) -> dict:
    tokens = chunks * L
    u = (torch.randn(batch, tokens, RANK, device="cuda", generator=gen) * 0.05).bfloat16()
    sv = torch.randn(batch, HKV, RANK, D, device="cuda", generator=gen).bfloat16()
    chunk_idx = torch.rand(batch, HKV, chunks, device="cuda", generator=gen).topk(K, dim=-1).indices
    pad = torch.randint(0, 64, (batch,), device="cuda", generator=gen)
    angles = torch.rand(batch, 1, tokens + 64, D // 2, device="cuda", generator=gen) * 6.3
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    out = torch.empty(batch, HKV, K * L, D, device="cuda", dtype=torch.bfloat16)
    args = (u, sv, chunk_idx, L, pad, cos, sin, "rotate_half")
    err = rel_err(triton_rebuild.rebuild_rope_keys(*args, out=out), naive.rebuild_rope_keys(*args))
    times = timings(lambda: rebuild_then_rope(u, sv, chunk_idx, pad, cos, sin),
                    lambda: triton_rebuild.rebuild_rope_keys(*args, out=out))
    rows = batch * HKV * K * L
    moved = 2 * (rows * RANK + batch * HKV * RANK * D + rows * D)
    return {**times, "err": err, "bytes": moved, "bytes_all": moved + 2 * 2 * rows * D}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 124928])
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--max-err", type=float, default=2e-2, help="fail when a Triton result is further off")
    parser.add_argument("--sweep-topk", action="store_true", help="time top-k at each warp and segment count")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kernel_bench needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"Hkv={HKV} G={G} D={D} r={RANK} L={L} k={K} chunks, bf16, n=1")
    header = (f"{'kernel':<8} {'context':>8} {'B':>3} {'chunks':>6} {'ref ms':>8} {'triton ms':>9} "
              f"{'ref graph':>9} {'tri graph':>9} {'speedup':>7} {'GB/s':>6} {'GB/s+tab':>8} {'rel err':>8}")
    print(header)
    print("-" * len(header))
    gen = torch.Generator(device="cuda").manual_seed(0)
    failed = []
    for context in args.contexts:
        chunks = context // L
        for batch in args.batches:
            for name, bench in (("score", bench_score), ("topk", bench_topk), ("rebuild", bench_rebuild)):
                r = bench(batch, chunks, gen)
                tri = r["triton_graph_ms"]
                print(f"{name:<8} {context:>8} {batch:>3} {chunks:>6} {r['ref_ms']:>8.3f} {r['triton_ms']:>9.3f} "
                      f"{r['ref_graph_ms']:>9.3f} {tri:>9.3f} {r['ref_graph_ms'] / tri:>6.1f}x "
                      f"{r['bytes'] / tri / 1e6:>6.0f} {r['bytes_all'] / tri / 1e6:>8.0f} {r['err']:>8.1e}")
                if not r["err"] <= args.max_err:
                    failed.append(f"{name} context={context} batch={batch}: rel err {r['err']:.2e}")
                torch.cuda.empty_cache()
            if args.sweep_topk:
                print("\n".join(sweep_topk(batch, chunks, gen)))
    if failed:
        raise SystemExit("Triton results off the reference:\n" + "\n".join(failed))


if __name__ == "__main__":
    main()
