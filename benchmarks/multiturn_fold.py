"""Multi-turn recall on SmolLM2: dense vs ShadowKV without folding vs ShadowKV with folding (issue #15).

Each sample is a conversation (``shadowkv_fx/evaluation/multiturn.py``): a long document, then
``--turns`` user messages hiding one needle each, the model replying to each through the same cache,
then a question about a needle from the first half of the turns. By then that turn is folded into
the compressed store (with folding) or still dense (without). Every method holds the same
conversations on a fresh copy of the model; the table gives accuracy, what folding did and the
cache's bytes at the end (the JSON has them after every turn).

    python benchmarks/multiturn_fold.py --device cpu --samples 2 --turns 6 --doc-length 1k --turn-length 256 \
        --reply-tokens 12 --out benchmarks/results/cpu_multiturn_fold.json
    python benchmarks/multiturn_fold.py --device cuda --out multiturn.json        # bfloat16, H100

Time goes mostly into the later turns: a multi-token forward through ShadowKV selects chunks for each
of its tokens in turn (what keeps speculative verification exact), so a turn costs one sparse decode
step per token. The defaults (10 conversations of a 3K document + 8 turns of <= 128 tokens) keep that
to ~11K sparse steps per ShadowKV method; ``--doc-length 2k --turns 20 --turn-length 256`` is the
issue's 20-turn conversation (7.4K tokens, within SmolLM2's 8K), ~5x that.

Values are offloaded to host memory by default (``--value-hbm-gib 0``, as in the paper), so the
device bytes are ShadowKV's own footprint; with spare HBM allowed, folded values would count there.
Each ShadowKV cache is sized up front for the conversation's longest possible length (every reply
at full length), as ``generate`` sizes one from ``max_new_tokens``: the store and the unfolded tail
never regrow mid-way, so the two ShadowKV runs are compared at the same capacity (a folding tail
starts at the fold window and grows once to fit a whole turn).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import DynamicCache

import shadowkv_fx
from shadowkv_fx.cache import ShadowKVCache, device_and_host_bytes
from shadowkv_fx.evaluation.multiturn import (
    MultiTurnSample,
    answered_turn,
    make_multiturn_samples,
    run_multiturn_sample,
)
from shadowkv_fx.smollm2 import load_smollm2


def cache_bytes(cache) -> dict[str, int]:
    """Device and host bytes a cache holds, and a dense cache's bytes for the same tokens."""
    if isinstance(cache, ShadowKVCache):
        report = cache.memory_report()
        device, host = device_and_host_bytes(report)
        return {"device": device, "host": host, "dense_kv": report["dense"]["kv"]}
    dense = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return {"device": dense, "host": 0, "dense_kv": dense}


def fold_stats(cache, query_end: int) -> dict:
    """Chunks folded past the prompt's (every layer folds the same), basis refreshes over all layers,
    dense tokens left past the store, and whether the store covers the queried turn (its tokens and
    its reply: the ``query_end`` first tokens of the conversation)."""
    if not isinstance(cache, ShadowKVCache):
        return {}
    state = cache.layers[0].state
    if not state.compressed:
        return {"folded_chunks": 0, "refreshes": 0, "dense_tail_tokens": state.lengths[0] + state.tail_len,
                "query_folded": False}
    # one unpadded sequence: chunk c covers conversation tokens [c * chunk, (c + 1) * chunk)
    stored = state.chunks[0] * state.config.chunk_size
    return {
        "folded_chunks": state.chunks[0] - state.prompt_chunks[0],
        "refreshes": sum(layer.state.refreshes for layer in cache.layers),
        "dense_tail_tokens": state.lengths[0] + state.tail_len - stored,
        "query_folded": stored >= query_end,
    }


def run_method(name: str, config: shadowkv_fx.ShadowKVConfig | None, samples, tokenizer, args) -> list[dict]:
    model, _ = load_smollm2(args.dtype, args.device)  # a fresh copy: optimize() works in place
    if config is not None:
        # no validation trace: SmolLM2 is known to rewrite, and generate's first call traces anew
        # (other kwargs), so validating would cost one more dynamo compile per method
        shadowkv_fx.optimize(model, config, cuda_graphs=args.cuda_graphs, validate=False)
    records = []
    for sample in samples:
        if config is None:
            cache = DynamicCache()
        else:
            # room for every later token up front: the store and tail never regrow mid-conversation
            cache = ShadowKVCache(model.config.num_hidden_layers, config,
                                  tail_capacity=sample.max_total_tokens - sample.doc_tokens)
        per_turn, turn_ends = [], []

        def after_turn(turn: int, ids: torch.Tensor) -> None:
            per_turn.append(cache_bytes(cache))
            turn_ends.append(ids.shape[1])

        start = time.perf_counter()
        result = run_multiturn_sample(model, tokenizer, sample, cache, after_turn=after_turn)
        if args.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        # turn_ends[0] is the document's reply; the queried turn's reply ends at turn_ends[query_turn + 1]
        record = {"method": name, "index": sample.index, "query_turn": sample.query_turn,
                  "references": sample.references, **result, "seconds": seconds, "bytes_after_turn": per_turn,
                  "tokens_after_turn": turn_ends, "cached_tokens": cache.get_seq_length(),
                  **fold_stats(cache, turn_ends[sample.query_turn + 1])}
        if isinstance(cache, ShadowKVCache):
            report = cache.memory_report()
            record["device_components"] = {name: nbytes for side, part in report.items()
                                           if side not in ("dense", "uncompressed")
                                           for name, nbytes in part.items() if name != "offloaded_V"}
        records.append(record)
        print(f"  {name} #{sample.index}: score {record['score']:.0f} answer {record['prediction']!r} "
              f"(ref {sample.references[0]}) folded {record.get('folded_chunks', '-')} "
              f"{record['seconds']:.1f} s", flush=True)
    del model
    return records


def table(records: list[dict], methods: list[str]) -> str:
    def mean(values) -> float:
        values = list(values)
        return sum(values) / len(values)

    columns = ["method", "accuracy (x100)", "named another turn's number", "folded chunks / sample",
               "queried turn folded", "basis refreshes / sample", "dense tokens at end", "device bytes at end",
               "host bytes at end", "dense KV bytes, same tokens", "s / sample (the first compiles)"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for name in methods:
        rows = [r for r in records if r["method"] == name]
        shadow = "folded_chunks" in rows[0]
        lines.append("| " + " | ".join([
            name,
            f"{100 * mean(r['score'] for r in rows):.1f}",
            f"{sum(r['answered_turn'] not in (None, r['query_turn']) for r in rows)}/{len(rows)}",
            f"{mean(r['folded_chunks'] for r in rows):.1f}" if shadow else "-",
            f"{sum(r['query_folded'] for r in rows)}/{len(rows)}" if shadow else "-",
            f"{mean(r['refreshes'] for r in rows):.1f}" if shadow else "-",
            f"{mean(r['dense_tail_tokens'] if shadow else r['cached_tokens'] for r in rows):.0f}",
            f"{mean(r['bytes_after_turn'][-1]['device'] for r in rows):,.0f}",
            f"{mean(r['bytes_after_turn'][-1]['host'] for r in rows):,.0f}",
            f"{mean(r['bytes_after_turn'][-1]['dense_kv'] for r in rows):,.0f}",
            f"{mean(r['seconds'] for r in rows):.1f}",
        ]) + " |")
    return "\n".join(lines)


def table_of_runs(runs: list[dict]) -> str:
    """One table of saved runs (e.g. one process per method, same samples); columns added since
    they ran are derived from their records and samples."""
    if any(run["samples"] != runs[0]["samples"] for run in runs):
        raise SystemExit("the runs held different conversations: their table would compare nothing")
    samples = {s["index"]: MultiTurnSample(**s) for s in runs[0]["samples"]}
    records = [r for run in runs for r in run["records"]]
    for r in records:
        if "answered_turn" not in r:
            r["answered_turn"] = answered_turn(samples[r["index"]], r["prediction"])
    return table(records, [name for run in runs for name in run["configs"]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="default: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--turns", type=int, default=8, help="user turns with a fact (the question comes after)")
    parser.add_argument("--doc-length", default="3k", help="tokens of the first turn's document, e.g. 3k")
    parser.add_argument("--turn-length", type=int, default=128, help="tokens of each fact turn, at most")
    parser.add_argument("--reply-tokens", type=int, default=8, help="tokens of each intermediate reply, at most")
    parser.add_argument("--budget", type=int, default=256, help="ShadowKV sparse_budget (tokens)")
    parser.add_argument("--rank", type=int, default=160)
    parser.add_argument("--value-hbm-gib", type=float, default=0.0,
                        help="values kept on the GPU (GiB); 0 offloads them all, as in the paper")
    parser.add_argument("--cuda-graphs", action="store_true", help="replay decode steps as CUDA graphs (GPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON with every record and the config")
    parser.add_argument("--methods", default="dense;shadowkv, no fold;shadowkv, fold",
                        help="';'-separated, of: dense; shadowkv, no fold; shadowkv, fold")
    parser.add_argument("--table", type=Path, nargs="+", default=None,
                        help="only print the table of earlier runs' JSON (several: one table)")
    args = parser.parse_args()
    if args.table is not None:
        print(table_of_runs([json.loads(path.read_text()) for path in args.table]))
        return
    args.dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "bfloat16"))
    if args.device == "cpu":
        torch.set_num_threads(2)

    probe, tokenizer = load_smollm2(torch.float32, "cpu")
    limit = probe.config.max_position_embeddings
    del probe
    samples = make_multiturn_samples(tokenizer, args.samples, seed=args.seed, doc_length=args.doc_length,
                                     turns=args.turns, turn_length=args.turn_length, reply_tokens=args.reply_tokens)
    longest = max(s.max_total_tokens for s in samples)
    if longest > limit:
        raise SystemExit(f"a conversation may reach {longest} tokens, past SmolLM2's {limit}: "
                         "lower --doc-length, --turns or --turn-length")
    base = shadowkv_fx.ShadowKVConfig(sparse_budget=args.budget, rank=args.rank, value_hbm_gib=args.value_hbm_gib)
    known = {
        "dense": None,
        "shadowkv, no fold": shadowkv_fx.ShadowKVConfig(**{**base.to_dict(), "fold_chunks": None}),
        "shadowkv, fold": base,
    }
    chosen = [m.strip() for m in args.methods.split(";")]
    if set(chosen) - set(known):
        raise SystemExit(f"unknown --methods {sorted(set(chosen) - set(known))}; known: {list(known)}")
    methods = {name: known[name] for name in chosen}
    print(f"SmolLM2-135M-Instruct, {args.device}, {str(args.dtype).removeprefix('torch.')}; {args.samples} "
          f"conversations: document {samples[0].doc_tokens} tokens, {args.turns} fact turns of <= {args.turn_length} "
          f"tokens, replies <= {args.reply_tokens}, then the question (<= {longest} tokens in all); ShadowKV "
          f"sparse_budget={args.budget}, rank={args.rank}, value_hbm_gib={args.value_hbm_gib:g}, other knobs default "
          f"(fold_chunks={base.fold_chunks})", flush=True)
    records = []
    for name, config in methods.items():
        records += run_method(name, config, samples, tokenizer, args)

    result = table(records, list(methods))
    print(result)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "args": {k: str(v) for k, v in vars(args).items()},
            "configs": {k: None if c is None else c.to_dict() for k, c in methods.items()},
            "samples": [s.to_dict() for s in samples], "records": records, "table": result,
        }, indent=1))
    unfolded = [r["index"] for r in records if r["method"] == "shadowkv, fold" and not r["folded_chunks"]]
    if unfolded:
        raise SystemExit(f"folding never happened in the fold run for samples {unfolded}: the comparison is void")


if __name__ == "__main__":
    main()
