"""Issue #32: does a needle cut by a chunk boundary come back whole? SmolLM2-135M on a CPU.

One niah_single_1 prompt (a 7-digit number in repeated noise, ~4.2K tokens; ``--task niah_single_2``:
in essay text) is shifted token by token so that the number's first digit sits at each offset
0..chunk_size-1 inside its chunk (up to chunk_size - 1 haystack tokens are dropped a quarter of the
way to the needle, the rest of the prompt is unchanged). Each shifted
prompt is answered by the dense model and by ShadowKV at budgets 1/8 and 1/4 of the prompt with
each ``span_neighbors``; the table counts exactly-right numbers per offset.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python3 benchmarks/needle_offsets.py --spans 0,1
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from transformers import DynamicCache

import shadowkv_fx
from shadowkv_fx import decode_step, dense_fallback
from shadowkv_fx.memory_report import device_and_host_bytes
from shadowkv_fx.demo import greedy_decode
from shadowkv_fx.evaluation.tasks import make_sample


def shifted_prompts(tokenizer, sample, chunk: int, cut_at: float) -> list[tuple[int, torch.Tensor, int]]:
    """``(offset, ids [1, T], first digit's token index)`` for each offset of the number's first digit
    in its chunk: ``(offset - current) % chunk`` tokens dropped at ``cut_at`` of the way to it."""
    enc = tokenizer(sample.prompt, add_special_tokens=False, return_offsets_mapping=True)
    ids, spans = enc["input_ids"], enc["offset_mapping"]
    value = sample.references[0]
    char = sample.prompt.index(value)
    first = next(i for i, (s, e) in enumerate(spans) if s <= char < e)
    cut = int(first * cut_at)
    out = []
    for offset in range(chunk):
        drop = (first - offset) % chunk
        shifted = ids[:cut] + ids[cut + drop:]
        assert (first - drop) % chunk == offset
        out.append((offset, torch.tensor([shifted]), first - drop))
    return out


class Coverage:
    """Counts the (decode step, layer, KV head) selections that hold every chunk with a digit of the
    needle (selected, or an outlier: attended densely anyway)."""

    def __init__(self):
        self.covered, self.pairs = 0, 0
        self.needed: list[int] = []
        self.plain = decode_step.select
        decode_step.select = self.select

    def start(self, first: int, digits: int, chunk: int) -> None:
        self.covered, self.pairs = 0, 0
        self.needed = list(range(first // chunk, (first + digits - 1) // chunk + 1))

    def select(self, state, q, scale):
        idx, picked = self.plain(state, q, scale)
        for h in range(idx.shape[1]):
            chosen = set(idx[0, h][picked[0, h]].tolist())
            dense = {c for c in self.needed if not bool(state.selectable[0, h, c])}
            self.covered += set(self.needed) <= chosen | dense
            self.pairs += 1
        return idx, picked


class Recalls:
    """Records the selection recall ``dense_fallback_recall`` measures at prefill, layer by layer
    (measured only where that bound is set)."""

    def __init__(self):
        self.seen: list[float] = []
        self.plain = dense_fallback.selection_recall
        dense_fallback.selection_recall = self.measure

    def measure(self, *args):
        self.seen.append(self.plain(*args))
        return self.seen[-1]


def answer(model, ids: torch.Tensor, new_tokens: int, cache, tokenizer) -> str:
    tokens, _, _ = greedy_decode(model, ids, new_tokens, cache)
    return tokenizer.decode(tokens[0], skip_special_tokens=True).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="niah_single_1", help="a one-number needle task: niah_single_1 (noise) "
                        "or niah_single_2 (essay)")
    parser.add_argument("--length", type=int, default=4224, help="prompt + answer tokens")
    parser.add_argument("--depth", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--fractions", default="8,4", help="budgets as 1/n of the prompt")
    parser.add_argument("--spans", default="0,1", help="span_neighbors values")
    parser.add_argument("--rank", type=int, default=160)
    parser.add_argument("--outliers", type=int, default=12)
    parser.add_argument("--local", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=9, help="7 digits, the period and one more")
    parser.add_argument("--offsets", default="2,3,4,5,6,7,0,1",
                        help="first digit's offsets in its chunk, in run order (a boundary cuts 2..7 at chunk 8)")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense reference (a CPU's time)")
    parser.add_argument("--dense-layers", default="", help="ShadowKVConfig.dense_layers, e.g. 7,8,17,18,26")
    parser.add_argument("--dense-fallback-error", type=float, default=None,
                        help="ShadowKVConfig.dense_fallback_error (relative key fit error bound)")
    parser.add_argument("--dense-fallback-recall", type=float, default=None,
                        help="ShadowKVConfig.dense_fallback_recall (prefill selection recall bound)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = shadowkv_fx.load_smollm2()
    sample = make_sample(args.task, tokenizer, args.length, seed=args.seed, depth=args.depth)
    by_offset = {p[0]: p for p in shifted_prompts(tokenizer, sample, args.chunk, cut_at=0.25)}
    prompts = [by_offset[int(o)] for o in args.offsets.split(",")]
    value = sample.references[0]
    print(f"{args.task}: needle {value!r}, depth {args.depth}, prompts {min(p[1].shape[1] for p in prompts)}.."
          f"{max(p[1].shape[1] for p in prompts)} tokens, chunk {args.chunk}, rank {args.rank}, "
          f"outliers {args.outliers}, local {args.local}", flush=True)
    t_min = min(p[1].shape[1] for p in prompts)
    dense_layers = tuple(int(i) for i in args.dense_layers.split(",") if i)
    print(f"dense_layers {dense_layers}, dense_fallback_error {args.dense_fallback_error}, "
          f"dense_fallback_recall {args.dense_fallback_recall}", flush=True)
    methods: list[tuple[str, object]] = []
    for frac in (int(f) for f in args.fractions.split(",")):
        budget = max(args.chunk, t_min // frac // args.chunk * args.chunk)
        for span in (int(s) for s in args.spans.split(",")):
            config = shadowkv_fx.ShadowKVConfig(sparse_budget=budget, rank=args.rank, chunk_size=args.chunk,
                                                local_chunks=args.local, outlier_chunks=args.outliers,
                                                span_neighbors=span, dense_layers=dense_layers,
                                                dense_fallback_error=args.dense_fallback_error,
                                                dense_fallback_recall=args.dense_fallback_recall)
            methods.append((f"1/{frac} ({budget} tok) span={span}", config))
    if not args.no_dense:
        methods.append(("dense", None))  # last: the team found it right; the sparse rows are the question
    # one optimized copy per method, offsets in the outer loop: a run cut short still compares every
    # method on the offsets it reached
    models = {name: model if config is None else shadowkv_fx.optimize(copy.deepcopy(model), config)
              for name, config in methods}
    right = {name: 0 for name, _ in methods}
    coverage = Coverage()
    recalls = Recalls()
    n_digits = len(tokenizer(value, add_special_tokens=False).input_ids)
    done = 0
    for offset, ids, first in prompts:
        for name, config in methods:
            start = time.perf_counter()
            coverage.start(first, n_digits, args.chunk)
            recalls.seen = []
            cache = DynamicCache(config=model.config) if config is None else models[name]._shadowkv.new_cache()
            got = answer(models[name], ids, args.new_tokens, cache, tokenizer)
            ok = value in got
            right[name] += ok
            held = f", digits' chunks held in {coverage.covered}/{coverage.pairs} (step, layer, head)" if config else ""
            print(f"offset {offset} (tokens {first}..{first + n_digits - 1}) {name:28s}: {'RIGHT' if ok else 'wrong'} "
                  f"{got!r}{held} ({time.perf_counter() - start:.0f} s)", flush=True)
            if config is not None and done == 0:  # once per method: what the fallback measured and costs
                errors = [round(1000 * float(layer.state.fit_err[0]), 1) if layer.state.prompt_chunks[0] else None
                          for layer in cache.layers]
                print(f"  fit_err per layer x1000 (None: kept dense): {errors}")
                if recalls.seen:
                    print(f"  prefill selection recall per layer: {[round(r, 3) for r in recalls.seen]}")
                report = cache.memory_report()
                device, host = device_and_host_bytes(report)
                print(f"  bytes: state {device} (dense_fallback {report['cpu'].get('dense_fallback', 0)}), "
                      f"values {host}, dense KV {report['dense']['kv']}; "
                      f"dense_fallback_layers {report['uncompressed'].get('dense_fallback_layers', 0)}", flush=True)
        done += 1
    print("\nsummary: exactly-right numbers out of", done, "offsets")
    for name, _ in methods:
        print(f"  {name:28s} {right[name]}/{done}")


if __name__ == "__main__":
    main()
