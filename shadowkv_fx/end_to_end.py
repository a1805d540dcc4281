"""Whole requests: N requests of P prompt tokens and G generated tokens, served as static batches.

A bench row measures one batch: its prefill and ``steps`` decode steps (folds included). Serving
N requests at that batch takes ``ceil(N / batch)`` such batches, one after another (the last may
be partly empty and costs a whole one: a static batch does), so

    total seconds = ceil(N / batch) * (prefill seconds + G * seconds per step)
    tokens/s      = N * G / total seconds

with G the row's ``steps``: run the bench with ``--steps G`` (1024 for the issue's target) so the
step time is the mean over a whole generation, not the first few steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class EndToEnd:
    method: str
    context: int
    batch: int
    requests: int
    generated: int
    prefill_s_per_seq: float
    batches: int
    total_s: float
    tok_s: float


def end_to_end(rows, requests: int) -> list[EndToEnd]:
    """One line per measured row that prefilled for real (a random fill has no prefill time)."""
    out = []
    for r in rows:
        if r.error or r.prefill_s is None or not r.step_ms:
            continue
        steps = r.steps
        batches = math.ceil(requests / r.batch)
        total = batches * (r.prefill_s + steps * r.step_ms / 1e3)
        out.append(EndToEnd(r.method, r.context, r.batch, requests, steps, r.prefill_s / r.batch, batches, total,
                            requests * steps / total))
    return out


def table(lines: list[EndToEnd]) -> str:
    if not lines:
        return ""
    text = [f"\nend to end: {lines[0].requests} requests, each method at the batches above "
            "(static batches one after another; prefill + every decode step measured)",
            f"{'method':<16}{'context':>8}{'batch':>6}{'generated':>10}{'prefill s/seq':>14}{'batches':>8}"
            f"{'total s':>9}{'tok/s':>9}{'vs best dense':>14}"]
    best_dense: dict[int, float] = {}
    for e in lines:
        if e.method.startswith("dense"):
            best_dense[e.context] = max(best_dense.get(e.context, 0.0), e.tok_s)
    for e in lines:
        ratio = f"{e.tok_s / best_dense[e.context]:.2f}x" if best_dense.get(e.context) else "-"
        text.append(f"{e.method:<16}{e.context:>8}{e.batch:>6}{e.generated:>10}{e.prefill_s_per_seq:>14.2f}"
                    f"{e.batches:>8}{e.total_s:>9.1f}{e.tok_s:>9.1f}{ratio:>14}")
    return "\n".join(text)
