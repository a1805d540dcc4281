"""Device bytes per sequence after N generated tokens, with and without folding (issue #15).

CPU, tiny random Llama (no download), one ~2K-token prompt, sparse config. Each N is its own
``generate(max_new_tokens=N)`` (buffers are sized from it), so the table shows what a cache holds
after N tokens; growth per token is the slope between consecutive N, beside a dense cache's.

    python benchmarks/fold_memory.py --prompt 2048 --tokens 256 1024 2048
"""
from __future__ import annotations

import argparse
import time

import torch
import transformers as T

import shadowkv_fx
from shadowkv_fx.cache import device_and_host_bytes
from shadowkv_fx.compat import output_cache


def tiny_llama(layers: int, kv_heads: int, head_dim: int, context: int = 16384) -> T.LlamaForCausalLM:
    heads = 2 * kv_heads
    cfg = T.LlamaConfig(vocab_size=256, hidden_size=heads * head_dim, intermediate_size=2 * heads * head_dim,
                        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                        head_dim=head_dim, max_position_embeddings=max(16384, context))
    torch.manual_seed(0)
    return T.LlamaForCausalLM(cfg).eval()


def device_bytes(config: shadowkv_fx.ShadowKVConfig, ids: torch.Tensor, new_tokens: int, args) -> tuple[int, int, float, dict]:
    model = shadowkv_fx.optimize(tiny_llama(args.layers, args.kv_heads, args.head_dim, ids.shape[1] + new_tokens), config)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             return_dict_in_generate=True, pad_token_id=0)
    report = output_cache(out).memory_report()
    device = device_and_host_bytes(report)[0]  # what a GPU would hold (this CPU run has one RAM)
    components = {name: nbytes for side, part in report.items() if side not in ("dense", "uncompressed")
                  for name, nbytes in part.items() if name != "offloaded_V"}
    return device, report["dense"]["kv"], time.perf_counter() - start, components


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--fold-chunks", type=int, default=4, help="the committed results ran with 4")
    parser.add_argument("--only", choices=["fold", "no fold"], default=None,
                        help="one of the two configs (two processes on a 2-core machine run them at once)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ids = torch.randint(3, 256, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    base = shadowkv_fx.ShadowKVConfig(sparse_budget=args.budget, rank=args.rank, outlier_chunks=8,
                                      fold_chunks=args.fold_chunks)
    configs = {f"fold (fold_chunks={args.fold_chunks})": base, "no fold (fold_chunks=None)": shadowkv_fx.ShadowKVConfig(
        **{**base.to_dict(), "fold_chunks": None})}
    print(f"tiny Llama: {args.layers} layers, {args.kv_heads} KV heads x {args.head_dim}, fp32, CPU; prompt "
          f"{args.prompt}; sparse_budget={args.budget}, rank={args.rank}, chunk 8, local 4, outliers 8")
    print("| config | N generated | device bytes/seq | dense KV bytes/seq | growth/token vs previous N | "
          "vs dense growth | generate s |")
    print("|---|---|---|---|---|---|---|")
    for name, config in configs.items():
        if args.only is not None and not name.startswith(args.only + " ("):
            continue
        previous = None
        for n in args.tokens:
            dev, dense, seconds, parts = device_bytes(config, ids, n, args)
            if previous is None:
                growth = ratio = "-"
            else:
                per_token = (dev - previous[0]) / (n - previous[2])
                dense_per_token = (dense - previous[1]) / (n - previous[2])
                growth, ratio = f"{per_token:.0f} B", f"{per_token / dense_per_token:.3f}x"
            print(f"| {name} | {n} | {dev:,} | {dense:,} | {growth} | {ratio} | {seconds:.1f} |", flush=True)
            if previous is not None and n == args.tokens[-1]:
                grew = {k: (v - previous[3].get(k, 0)) / (n - previous[2]) for k, v in parts.items()}
                print(f"|   growth/token by component, {previous[2]} -> {n}: " + ", ".join(
                    f"{k} {v:.0f} B" for k, v in grew.items() if v) + " | | | | | | |", flush=True)
            previous = (dev, dense, n, parts)


if __name__ == "__main__":
    main()
