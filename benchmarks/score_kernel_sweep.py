"""Time of one layer's chunk scoring on a GPU, each kernel replayed in a CUDA graph (as a decode step
runs it): 16-bit landmarks, 8-bit landmarks of 2 runs, and 4-bit key codes with the code kernel's
tiles and dot forms (GPU_TILES['dot']) swept, each checked against the naive twin (issue #32's step cost). Llama-3.1-8B
shapes (8 KV heads of 128, groups of 4), one query.

    python benchmarks/score_kernel_sweep.py [BEST.json]   # 32K x 4 and 122K x 1, chunks of 8

The fastest code tiles at 32K x 4 that match the naive twin go to BEST.json (for ``GPU_TILES.update``).
"""
from __future__ import annotations

import itertools
import json
import os
import sys

import torch

from shadowkv_fx.kernels import key_codes, naive, quantize, triton_code_score, triton_score

sys.path.insert(0, os.path.dirname(__file__))
from kernel_bench import D, G, HKV, graph_ms  # noqa: E402  (a sibling script: its L2-flushed graph timing)

LAYERS = 32
# (form, tokens a block, warps, blocks a program, pipeline stages): one block a program in every column form
# and tile, then the looped, pipelined program (3 stages led the H100's sweep of 2-4) in the forms that led
# the one-block sweep; SWEEP_FORMS=a,b keeps those forms only, SWEEP_BLOCKS=a,b those blocks a program
_LOOPED = ("fp16_bits", "int8x2", "fp16_asm", "fp16_asm_phases", "fp16_asm_phases_tokens")
TILES = [*itertools.product(("fp16", *_LOOPED), (128, 256), (4, 8), (1,), (1,)),
         *itertools.product(_LOOPED, (128, 256), (4, 8), (4, 16), (3,))]
if os.environ.get("SWEEP_FORMS"):
    TILES = [tile for tile in TILES if tile[0] in os.environ["SWEEP_FORMS"].split(",")]
if os.environ.get("SWEEP_BLOCKS"):  # SWEEP_BLOCKS=4,16 keeps the looped programs of 4 and 16 blocks only
    TILES = [tile for tile in TILES if str(tile[3]) in os.environ["SWEEP_BLOCKS"].split(",")]
# (batch, context) swept; SWEEP_CONTEXTS=32768 keeps that one (the fastest tiles are chosen there)
SHAPES = [(b, ctx) for b, ctx in ((4, 32768), (1, 122880))
          if str(ctx) in os.environ.get("SWEEP_CONTEXTS", "32768,122880").split(",")]


def graphed_us(fn) -> float:
    """GPU microseconds a call, replayed from a CUDA graph after an L2 flush (``kernel_bench.graph_ms``): a decode
    step reads each layer's landmarks or codes once, cold. (Rows committed before session 12 replayed back to back,
    with no flush: a set that fits the 50 MB L2, 32K x 4's 16-bit landmarks, read warm there.)"""
    return graph_ms(fn) * 1000


def scoring_inputs(b: int, ctx: int, chunk: int = 8):
    """One layer's random decode query ``[b, Hq, 1, D]`` (bf16) and ``ctx`` keys a sequence, as each scorer reads them:
    ``(q, selectable, 16-bit landmarks, (2 runs' int8 landmarks, their scales), (4-bit codes, code scale))``."""
    c = ctx // chunk
    q = torch.randn(b, HKV * G, 1, D, device="cuda", dtype=torch.bfloat16)
    keys = torch.randn(b, HKV, ctx, D, device="cuda")
    sel = torch.rand(b, HKV, c, device="cuda") > 0.01
    landmarks = keys.view(b, HKV, c, chunk, D).mean(3).bfloat16()
    runs = quantize.quantize(keys.view(b, HKV, c * 2, chunk // 2, D).mean(3), 1)
    scale = key_codes.fit_scale(keys)
    return q, sel, landmarks, runs, (key_codes.encode(keys, scale, chunk), scale)


def main(best_path: str | None = None) -> None:
    torch.manual_seed(0)
    best: tuple[float, dict] = (float("inf"), {})
    print(f"{torch.cuda.get_device_name()}; per layer (us) and x{LAYERS} layers (ms a step)")
    for b, ctx in SHAPES:
        q, sel, lm16, (runs, run_scale), (codes, scale) = scoring_inputs(b, ctx)
        sel2 = sel.repeat_interleave(2, -1)
        rows = {"landmarks 16-bit": lambda: triton_score.score_chunks(q, lm16, sel, D**-0.5),
                "2 runs, 8-bit": lambda: triton_score.score_chunks(q, runs, sel2, D**-0.5, run_scale)}
        print(f"\n{ctx} x {b}: codes {codes.numel() / 2**20:.0f} MiB, 16-bit landmarks {lm16.numel() * 2 / 2**20:.0f} MiB "
              "a layer")
        for name, fn in rows.items():
            us = graphed_us(fn)
            print(f"  {name:<34} {us:8.1f} us  {us * LAYERS / 1000:6.3f} ms")
        want = naive.score_code_chunks(q, codes, scale, sel, D**-0.5)
        for form, block_t, warps, blocks, stages in TILES:
            tiles = dict(block_t=block_t, num_warps=warps, dot=form, blocks=blocks, stages=stages)
            triton_code_score.GPU_TILES.update(tiles)
            name = f"codes ({form}), {block_t} tokens, {warps} warps, {blocks}x{stages} stages"

            def score():
                return triton_code_score.score_code_chunks(q, codes, scale, sel, D**-0.5)

            try:
                error = (score() - want).nan_to_num(0.0, 0.0, 0.0).abs().max().item()  # -inf where unselectable
                us = graphed_us(score)
            except Exception as failure:  # a tile or form the GPU cannot compile: say so, go on
                print(f"  {name}: {type(failure).__name__}: {str(failure).splitlines()[-1][:200]}")
                continue
            print(f"  {name:<56} {us:8.1f} us  {us * LAYERS / 1000:6.3f} ms  ({codes.numel() / us / 1e3:.0f} GB/s; "
                  f"max |score - naive| {error:.1e})")
            if ctx == 32768 and error < 1e-4 and us < best[0]:
                best = (us, tiles)
    print(f"\nfastest exact code tiles at 32K x 4: {best[1]} ({best[0]:.1f} us)")
    if best_path:
        with open(best_path, "w") as f:
            json.dump(best[1], f)


if __name__ == "__main__":
    main(*sys.argv[1:2])
