"""Seconds to ask a question of a stored document: the question's tokens through the model on a copy
of the document's compressed cache (transformers' prompt-reuse recipe, what ``ShadowKVSlots`` runs
on a prefix-store hit), each token selecting its own chunks two ways in one process:
``at once`` (``decode_step.attend_earlier``) and ``one at a time`` (the loop it replaced). Also the
document's prefill in one piece and in ``--piece``-token pieces (a serving slot's prefill).

    python benchmarks/question_step.py --context 122880 --questions 32,56 --out OUT

Same model (Llama-3.1-8B shape, random bf16 weights), same document and questions; every point
after a warm-up that compiled its graphs; each time is the median of ``--repeats`` after a sync.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import time

import torch

import shadowkv_fx
from shadowkv_fx import bench, decode_step


def one_at_a_time(state, q, k_pre_new, v_new, rope_inputs, rope_fn, scale):
    """The loop ``attend_earlier`` replaced: each token's score, top-k, rebuild, gather, attention."""
    decode_step.append_tail(state, k_pre_new, v_new, rope_inputs, rope_fn)
    n = q.shape[2]
    if n > 1 and state.compressed:
        return torch.cat([decode_step._attend(state, q[:, :, i : i + 1], rope_fn, scale, n - 1 - i)
                          for i in range(n)], dim=2)
    return decode_step._attend(state, q, rope_fn, scale, 0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ask_seconds(model, document, question: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    times, logits = [], None
    for _ in range(repeats + 1):  # the first compiles this question length's graphs
        cache = copy.deepcopy(document)
        sync(question.device)
        start = time.perf_counter()
        with torch.no_grad():
            logits = model(input_ids=question, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        sync(question.device)
        times.append(time.perf_counter() - start)
        del cache
    return statistics.median(times[1:]), logits


def prefill(model, cache, ids: torch.Tensor, piece: int | None) -> None:
    """A document prefilled into the empty ``cache``: in one forward, or in pieces of ``piece``
    tokens as ``ShadowKVSlots`` prefills a document (``prefill_pieces``)."""
    with torch.no_grad():
        if piece is None:
            model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        else:
            for _ in model._shadowkv.prefill_pieces(cache, ids):
                pass


def prefill_seconds(model, config, ids: torch.Tensor, piece: int | None) -> tuple[float, shadowkv_fx.ShadowKVCache]:
    cache = shadowkv_fx.ShadowKVCache(model.config.num_hidden_layers, config, prefill_chunk_size=piece)
    sync(ids.device)
    start = time.perf_counter()
    prefill(model, cache, ids, piece)
    sync(ids.device)
    return time.perf_counter() - start, cache


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=122880)
    parser.add_argument("--questions", default="32,56", help="comma-separated question lengths (tokens)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bits", type=int, default=8, help="value and landmark bits")
    parser.add_argument("--piece", type=int, default=4096,
                        help="also time the document prefilled in pieces of this many tokens (ShadowKVSlots'); 0: not")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (fewer: a smoke run)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="question_step")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    model = bench.llama31_8b_random(args.layers, args.device)
    config = dataclasses.replace(shadowkv_fx.ShadowKVConfig(), value_bits=args.bits, landmark_bits=args.bits,
                                 value_hbm_gib=0)
    bench.ensure_optimized(model, config)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, args.context), generator=gen).to(args.device)
    # each prefill twice, the second timed: the first compiles its shapes
    one_piece = [prefill_seconds(model, config, ids, None) for _ in range(2)][1]
    in_pieces = [prefill_seconds(model, config, ids, args.piece) for _ in range(2)][1] if args.piece else (None, None)
    document = one_piece[1]
    rows = [{"document_prefill_s": one_piece[0], "in_pieces_s": in_pieces[0], "piece": args.piece or None}]
    del in_pieces
    plain = decode_step.decode
    for n in map(int, args.questions.split(",")):
        question = torch.randint(3, model.config.vocab_size, (1, n), generator=gen).to(args.device)
        at_once, logits = ask_seconds(model, document, question, args.repeats)
        decode_step.decode = one_at_a_time
        try:
            looped, looped_logits = ask_seconds(model, document, question, args.repeats)
        finally:
            decode_step.decode = plain
        rows.append({"question_tokens": n, "at_once_s": at_once, "one_at_a_time_s": looped,
                     "max_abs_logit_diff": float((logits.float() - looped_logits.float()).abs().max()),
                     "same_next_token": bool(logits.argmax(-1).eq(looped_logits.argmax(-1)).all())})
        print(json.dumps(rows[-1]), flush=True)
    lines = [f"question asked of a stored {args.context}-token document on {device_name(ids.device)}, "
             f"{args.bits}-bit values and landmarks, values in pinned host memory; document prefill "
             f"{rows[0]['document_prefill_s']:.2f} s in one piece"
             + (f", {rows[0]['in_pieces_s']:.2f} s in pieces of {args.piece}" if args.piece else ""),
             f"{'tokens':>6} {'at once s':>10} {'one at a time s':>16} {'speed-up':>9} {'max |dlogit|':>13} same token"]
    for r in rows[1:]:
        lines.append(f"{r['question_tokens']:>6} {r['at_once_s']:>10.3f} {r['one_at_a_time_s']:>16.3f} "
                     f"{r['one_at_a_time_s'] / r['at_once_s']:>8.1f}x {r['max_abs_logit_diff']:>13.3g} "
                     f"{r['same_next_token']}")
    print("\n".join(lines))
    with open(os.path.join(args.out, "question_step.json"), "w") as f:
        json.dump({"command": " ".join(sys.argv), "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "table.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
