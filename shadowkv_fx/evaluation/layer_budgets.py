"""Per-layer sparse budgets from a prefill's measurements, at the same total (issue #32's safeguard).

The landmark selection does not miss attention evenly: on SmolLM2-135M some layers' picks hold
0.45-0.62 of the best chunks' exact attention mass where others hold 0.95+
(``benchmarks/results/cpu_dense_fallback``). A uniform budget spends as many chunks on a layer whose
pick is already near-perfect as on one that misses. ``allocate`` measures, on a prompt the user
picks, how each layer's exact-mass recall grows with its budget (``diagnostics.layer_diagnostics``
at a few budgets), then splits the same total over the layers where a chunk buys the most recall
(greedy on the measured curves, which rise with diminishing returns): the result goes to
``ShadowKVConfig(layer_budgets=...)``. Decode buffers and per-step bytes stay within the uniform
budget's, since the total is never exceeded.

    budgets = allocate(model, calibration_ids, ShadowKVConfig(sparse_budget=256))
    config = ShadowKVConfig(sparse_budget=256, layer_budgets=budgets)
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import torch

from ..config import ShadowKVConfig
from .diagnostics import layer_diagnostics

# budgets measured, as multiples of the uniform one
GRID = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0)


# what a budget buys a layer (a ``layer_diagnostics`` column): how near the landmark pick comes to the best
# chunks (``mass_recall``, for landmarks), or how much attention the best chunks hold (``coverage``, for a
# selection that comes near the best: ``key_code_bits``)
MEASURES = ("mass_recall", "coverage")


def recall_curves(model, input_ids: torch.Tensor, config: ShadowKVConfig, grid=GRID,
                  queries: int = 16, measure: str = "mass_recall") -> dict[int, dict[int, float]]:
    """``{layer: {budget chunks: mean measure over KV heads}}`` of ``input_ids [1, T]`` (``measure``: one of
    ``MEASURES``), one dense prefill per budget of ``grid`` (times ``config.budget_chunks``, at least one chunk)."""
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
    curves: dict[int, dict[int, float]] = defaultdict(dict)
    for chunks in sorted({max(1, round(f * config.budget_chunks)) for f in grid}):
        budget = replace(config, sparse_budget=chunks * config.chunk_size, layer_budgets=None, dense_layers=())
        rows = layer_diagnostics(model, input_ids, budget, queries=queries)
        for layer in {r["layer"] for r in rows}:
            mine = [r[measure] for r in rows if r["layer"] == layer]
            curves[layer][chunks] = sum(mine) / len(mine)
    return dict(curves)


def split_total(curves: dict[int, dict[int, float]], total_chunks: int) -> list[int]:
    """Chunks per layer (layers ``0..len(curves)-1``), at most ``total_chunks`` together: every layer
    starts at its smallest measured budget; then, while chunks remain, the layer whose next measured
    budget buys the most recall per extra chunk steps up to it."""
    layers = sorted(curves)
    if layers != list(range(len(layers))) or any(not c for c in curves.values()):
        raise ValueError("curves must give measured budgets for layers 0..L-1")
    levels = {layer: sorted(curves[layer]) for layer in layers}
    at = {layer: 0 for layer in layers}  # index into levels[layer]
    spent = sum(levels[layer][0] for layer in layers)
    if spent > total_chunks:
        raise ValueError(f"the smallest measured budgets already take {spent} chunks, over the total "
                         f"{total_chunks}: measure smaller budgets or give a larger total")
    while True:
        best, best_gain = None, 0.0
        for layer in layers:
            i = at[layer]
            if i + 1 == len(levels[layer]):
                continue
            cost = levels[layer][i + 1] - levels[layer][i]
            gain = (curves[layer][levels[layer][i + 1]] - curves[layer][levels[layer][i]]) / cost
            if spent + cost <= total_chunks and (best is None or gain > best_gain):
                best, best_gain = layer, gain
        if best is None:
            break
        spent += levels[best][at[best] + 1] - levels[best][at[best]]
        at[best] += 1
    return [levels[layer][at[layer]] for layer in layers]


def allocate(model, prompts: torch.Tensor | list[torch.Tensor], config: ShadowKVConfig, grid=GRID,
             queries: int = 16, measure: str = "mass_recall") -> tuple[int, ...]:
    """Per-layer ``sparse_budget``s (tokens) for ``ShadowKVConfig.layer_budgets``: the uniform
    ``config.sparse_budget`` times the number of layers, split by the measured ``measure`` (``split_total``)
    averaged over ``prompts`` (each ``[1, T]``: prompts like the ones to be served)."""
    measured = [recall_curves(model, ids, config, grid, queries, measure) for ids in (
        prompts if isinstance(prompts, (list, tuple)) else [prompts])]
    curves = {layer: {k: sum(c[layer][k] for c in measured) / len(measured) for k in measured[0][layer]}
              for layer in measured[0]}
    chunks = split_total(curves, config.budget_chunks * len(curves))
    return tuple(c * config.chunk_size for c in chunks)


def rescaled(budgets: list[int], uniform: int, layers: int, sparse_budget: int, chunk_size: int) -> tuple[int, ...]:
    """A split measured on one model (``budgets`` against its ``uniform`` budget) carried to another of
    ``layers`` layers at ``sparse_budget``: each layer takes the share of the layer at the same depth, in
    whole chunks (at least one), the shares scaled so the total stays ``sparse_budget * layers`` (for the
    benchmark of a split on a model no calibration prompt can be run through: random weights)."""
    total = sparse_budget // chunk_size * layers
    if uniform <= 0 or not budgets or min(budgets) <= 0 or sparse_budget % chunk_size or total < layers:
        raise ValueError(f"need a measured split, a positive uniform budget and a sparse_budget in whole chunks of "
                         f"{chunk_size}, got {len(budgets)} budgets, uniform {uniform}, sparse_budget {sparse_budget}")
    shares = [budgets[i * len(budgets) // layers] / uniform for i in range(layers)]
    wanted = [s * total / sum(shares) for s in shares]
    chunks = [max(1, int(w)) for w in wanted]
    while sum(chunks) != total:  # whole chunks: the layers furthest from their share move first
        short = sum(chunks) < total
        pick = max((i for i in range(layers) if short or chunks[i] > 1),
                   key=lambda i: (wanted[i] - chunks[i]) if short else (chunks[i] - wanted[i]))
        chunks[pick] += 1 if short else -1
    return tuple(c * chunk_size for c in chunks)
