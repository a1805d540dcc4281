"""Decode-step time, side by side in one run: HF dense vs ShadowKV eager / inductor / reduce-overhead.

reduce-overhead is what ``torch.compile(model, backend="shadowkv", mode="reduce-overhead")`` selects:
inductor around the ShadowKV ops, and each decode step captured whole as one CUDA graph.

Llama-3.1-8B-shaped model with random bf16 weights (no download). Run on a GPU:

    python benchmarks/decode_step.py --context 32768 --batch 1 2 4 --steps 16
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import transformers as T
from transformers import DynamicCache

import shadowkv_fx
from shadowkv_fx import compat
from shadowkv_fx.backend import inductor_graph
from shadowkv_fx.bench import llama31_8b_random


def llama31_8b(layers: int) -> T.LlamaForCausalLM:
    return llama31_8b_random(layers)


def timed_decode(model, ids, steps: int, cache) -> dict:
    """Prefill, two warm-up steps, then ``steps`` timed greedy steps (CUDA-synchronised)."""
    with torch.no_grad():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(ids, **{compat.CACHE_ARG: cache}, use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize()
        prefill = time.perf_counter() - t0
        token = out.logits[:, -1:].argmax(-1)
        tokens = [token]
        for i in range(steps + 2):
            if i == 2:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            out = model(token, **{compat.CACHE_ARG: compat.output_cache(out)}, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(token)
        torch.cuda.synchronize()
        per_step = (time.perf_counter() - t0) / steps
    return {"prefill_s": prefill, "step_ms": 1e3 * per_step, "tok_s": ids.shape[0] / per_step,
            "tokens": torch.cat(tokens, 1).tolist(), "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def run(args) -> list[dict]:
    model = llama31_8b(args.layers)
    config = shadowkv_fx.ShadowKVConfig(sparse_budget=args.budget, rank=args.rank, outlier_chunks=args.outliers)
    variants = {  # name -> (graph compiler after the pass, capture decode steps as CUDA graphs)
        "shadowkv-eager": (None, False),
        "shadowkv-inductor": (inductor_graph, False),
        "shadowkv-reduce-overhead": (inductor_graph, True),
    }
    rows = []
    for batch in args.batch:
        ids = torch.randint(0, 128000, (batch, args.context), device="cuda")
        methods = [m for m in ["dense", *variants] if m in args.methods]
        for method in methods:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                if method == "dense":
                    result = timed_decode(model, ids, args.steps, DynamicCache(config=model.config))
                else:
                    compile_graph, cuda_graphs = variants[method]
                    shadowkv_fx.optimize(model, config, compile_graph=compile_graph, cuda_graphs=cuda_graphs)
                    timed_decode(model, ids, 2, None)  # compile the prefill and decode graphs at these shapes
                    result = timed_decode(model, ids, args.steps, None)
            except torch.OutOfMemoryError as exc:
                result = {"error": f"OOM: {str(exc)[:120]}"}
            finally:
                if getattr(model, "_shadowkv", None) is not None:
                    shadowkv_fx.restore(model)
            row = {"method": method, "batch": batch, "context": args.context, **result}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)
    return rows


def summary(rows: list[dict]) -> str:
    """The side-by-side table. Token columns compare greedy tokens with ShadowKV eager and with
    ShadowKV + inductor at the same batch (bf16 fusion may flip near-tied tokens of a random model;
    a captured graph must match the inductor graph it captures exactly)."""
    def tokens_of(method):
        return {r["batch"]: r["tokens"] for r in rows if r["method"] == method and "tokens" in r}

    eager, inductor = tokens_of("shadowkv-eager"), tokens_of("shadowkv-inductor")
    lines = [f"{'method':<26}{'batch':>6}{'context':>9}{'prefill s':>11}{'ms/step':>10}{'tok/s':>9}{'peak GiB':>10}"
             f"  {'= eager':>8}  {'= inductor':>10}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['method']:<26}{r['batch']:>6}{r['context']:>9}  {r['error']}")
            continue
        same = ["-" if r["method"] == "dense" or b not in ref else str(r["tokens"] == ref[b])
                for ref, b in ((eager, r["batch"]), (inductor, r["batch"]))]
        lines.append(f"{r['method']:<26}{r['batch']:>6}{r['context']:>9}{r['prefill_s']:>11.2f}{r['step_ms']:>10.2f}"
                     f"{r['tok_s']:>9.1f}{r['peak_gib']:>10.1f}  {same[0]:>8}  {same[1]:>10}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--rank", type=int, default=160)
    p.add_argument("--outliers", type=int, default=48)
    p.add_argument("--methods", nargs="+", default=["dense", "shadowkv-eager", "shadowkv-inductor", "shadowkv-reduce-overhead"])
    p.add_argument("--out", default=None)
    p.add_argument("--render", default=None, help="print the table of an earlier --out JSON; run nothing")
    args = p.parse_args()
    rows = json.load(open(args.render)) if args.render else run(args)
    print(summary(rows))
    if args.out and not args.render:
        with open(args.out, "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main()
