"""Decode step time and device bytes as the output grows: ShadowKV with and without folding.

One process, one optimized model, one prompt: the same greedy decode runs twice, once with a
cache whose config folds the tail (``fold_chunks``, the default) and once with
``fold_chunks=None``; each run times windows of steps around the given output lengths.

    python benchmarks/fold_steps.py --context 32768 --generate 16384 --at 1024,16384
    python benchmarks/fold_steps.py --methods "no folding" ...   # one of the two runs only
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

import shadowkv_fx
from shadowkv_fx.backend import inductor_graph
from shadowkv_fx.bench import llama31_8b_random
from shadowkv_fx.cache import device_and_host_bytes


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def device_bytes(cache) -> int:
    return device_and_host_bytes(cache.memory_report())[0]


def decode_run(model, ids: torch.Tensor, config, generate: int, at: list[int], window: int) -> list[dict]:
    """Greedy decode of ``generate`` tokens; for each length in ``at``, the mean step time over the
    ``window`` steps ending there and the cache's device bytes then."""
    # sized for the whole output, as ``generate(max_new_tokens=...)`` sizes it: no buffer regrows (and
    # no CUDA graph is captured again) mid-run; a folding cache keeps only its bounded dense tail
    cache = shadowkv_fx.ShadowKVCache(model.config.num_hidden_layers, config, tail_capacity=generate)
    rows, start = [], None
    with torch.no_grad():
        token = model(ids, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
        for made in range(1, generate + 1):
            if made + window - 1 in at:
                _sync()
                start = time.perf_counter()
            token = model(token, cache=cache).logits[:, -1:].argmax(-1)
            if made in at:
                _sync()
                rows.append({"generated": made, "step_ms": 1e3 * (time.perf_counter() - start) / window,
                             "device_mib": device_bytes(cache) / 2**20})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--generate", type=int, default=16384)
    parser.add_argument("--at", default="1024,16384", help="output lengths at which to time a window of steps")
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--methods", default="folding,no folding",
                        help="which runs, in order (one per process lets two GPUs of a host run them at once)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    at = [int(x) for x in args.at.split(",")]
    if max(at) > args.generate or min(at) < args.window:
        raise SystemExit("--at lengths must lie in [--window, --generate]")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = llama31_8b_random(args.layers, device=device)
    folding = shadowkv_fx.ShadowKVConfig()
    plain = dataclasses.replace(folding, fold_chunks=None)
    shadowkv_fx.optimize(model, folding, compile_graph=inductor_graph if device == "cuda" else None,
                         cuda_graphs=device == "cuda")
    ids = torch.randint(0, model.config.vocab_size - 1, (1, args.context), device=device)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"Llama-3.1-8B shape ({args.layers} layers), random bf16 weights, {name}; prompt {args.context}, batch 1")
    rows = []
    configs = {"folding": folding, "no folding": plain}
    unknown = set(args.methods.split(",")) - set(configs)
    if unknown:
        raise SystemExit(f"unknown --methods {sorted(unknown)}; known: {list(configs)}")
    for label in args.methods.split(","):
        config = configs[label]
        for row in decode_run(model, ids, config, args.generate, at, args.window):
            rows.append({"method": label, **row})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'method':<12}{'generated':>10}{'ms/step':>9}{'device MiB':>12}")
    for r in rows:
        print(f"{r['method']:<12}{r['generated']:>10}{r['step_ms']:>9.2f}{r['device_mib']:>12.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "context": args.context, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
