"""Dense fallback: a layer (``ShadowKVConfig.dense_layers``), or a layer's prompt whose prefill
measurement is out of bounds (``dense_fallback_error``: the low-rank key fit; ``dense_fallback_recall``:
the landmark selection's recall of exact attention mass), is kept whole on the device and attended
densely, through the path a prompt too short to compress already takes (``prompt_chunks[b] == 0``: the
whole prompt in the local window, no selection, no fold).

Why that path: the decode step, the CUDA graph and the compiled decoder layer stay as they are; a
layer's state only differs in its buffer widths and flags, which the ShadowKV op reads at run time
(one compiled region serves every layer; no new graph shape reaches it).

Why per row for the measured bounds: a measurement is a property of one prompt in one layer, and
prefill compresses a batch a group of rows at a time (``prefill_rows``), so when a later group's
prompt fails a bound the earlier rows are already compressed and their dense keys gone. A failing row
is kept dense on its own (its layer's local window widens to hold it, in prefill-only buffers, before
the decode buffers are built); the other rows stay compressed, and the layer keeps its store. Listed
layers are dense for every row, decided before anything is allocated, so they keep no store at all.

The measurements: ``fit_err`` is free (``kernels/compression.compress_prompt`` computes it), but on
SmolLM2-135M it was 1e-2 to 3.2e-2 in every layer but the first and did not single out the layers the
diagnostics found selecting worst (7, 8, 17, 18, 26: benchmarks/results/cpu_intensive_tasks).
``selection_recall`` is that diagnostic itself, on the prompt's last ``RECALL_QUERIES`` queries, at
``Hq * RECALL_QUERIES * T`` logits per layer and prompt: a small share of the prefill's attention.
"""
from __future__ import annotations

import torch

from shadowkv_fx.config import ShadowKVConfig
from shadowkv_fx import selection_mass
from shadowkv_fx.kernels import compression
from shadowkv_fx.pinned import grown
from shadowkv_fx.prompt_layout import PromptLayout

# prompt queries (the last ones) whose attention ``dense_fallback_recall`` measures, as the diagnostics
# that found SmolLM2's worst layers did (benchmarks/results/cpu_intensive_tasks)
RECALL_QUERIES = 16


def check_layers(config: ShadowKVConfig, num_layers: int) -> None:
    """``ValueError`` naming the fix when ``dense_layers`` names a layer the model does not have, or
    ``layer_budgets`` does not give one budget per layer."""
    if config.layer_budgets is not None and len(config.layer_budgets) != num_layers:
        raise ValueError(f"ShadowKVConfig.layer_budgets gives {len(config.layer_budgets)} budgets for a model of "
                         f"{num_layers} layers: give one per layer")
    missing = [i for i in config.dense_layers if i >= num_layers]
    if missing:
        raise ValueError(f"ShadowKVConfig.dense_layers names layers {missing} but the model has {num_layers} "
                         f"(0 to {num_layers - 1}): drop them")


def layer_layouts(config: ShadowKVConfig, layer_idx: int, rows: list[int], dense: frozenset[int],
                  group: PromptLayout, layout: PromptLayout) -> tuple[PromptLayout, PromptLayout]:
    """The group's and the batch's layouts (``group`` holds batch rows ``rows``) as layer ``layer_idx``
    compresses them: a listed dense layer leaves every prompt uncompressed (``chunks`` 0), so its state
    is built as a short prompt's is; another leaves the batch rows ``dense`` uncompressed."""
    if layer_idx in config.dense_layers:
        dense = frozenset(range(len(layout.lengths)))
    if not dense:
        return group, layout
    return (PromptLayout(group.pad, group.lengths, [0 if b in dense else c for b, c in zip(rows, group.chunks)],
                         group.padded_len),
            PromptLayout(layout.pad, layout.lengths, [0 if b in dense else c for b, c in enumerate(layout.chunks)],
                         layout.padded_len))


def reads_tables(state, layout: PromptLayout, batch: PromptLayout) -> bool:
    """Whether a layer's ``state`` (a LayerState) reads the batch's shared RoPE tables: it keeps a store
    (sized by the first group of rows, from the layer's ``layout``), or no layer does (``batch``)."""
    has_store = state.compressed if state.lengths else layout.max_chunks > 0  # lengths: set by the first group
    return has_store or not batch.max_chunks


def compressed(config: ShadowKVConfig, k_pre: torch.Tensor, k_rot: torch.Tensor, v: torch.Tensor,
               tokens: int) -> compression.CompressedPrompt | None:
    """The first ``tokens`` (whole chunks) of one prompt's keys and values (``[Hkv, T, D]``) compressed,
    or None where the basis fits those keys with a relative error above ``dense_fallback_error``: the
    prompt stays dense. Without that bound the basis is left to the caller (``u`` None: ``key_basis``)."""
    k_pre, k_rot, v = k_pre[:, :tokens], k_rot[:, :tokens], v[:, :tokens]
    bound = config.dense_fallback_error
    c = compression.compress_prompt(k_pre, k_rot, v, config.rank, config.chunk_size, config.outlier_chunks,
                                    config.landmark_runs, config.key_code_bits, basis=bound is not None)
    return None if bound is not None and float(c.fit_err) > bound else c


def low_recall_rows(config: ShadowKVConfig, layer_idx: int, q: torch.Tensor, k_rot: torch.Tensor,
                    group: PromptLayout, rows: list[int], scale: float) -> frozenset[int]:
    """Batch rows ``rows`` (laid out as ``group``) whose landmark selection in layer ``layer_idx`` recalls
    less exact attention mass than ``dense_fallback_recall`` (``selection_recall`` of the prompt's last
    ``RECALL_QUERIES`` queries), so their prompt is kept dense there (a listed dense layer measures
    nothing). ``q [rows, Hq, n, D]`` post-RoPE queries of the prompts' last ``n`` columns; ``k_rot [rows,
    Hkv, S, D]`` the whole prompts' keys."""
    bound = config.dense_fallback_recall
    if bound is None or layer_idx in config.dense_layers:
        return frozenset()
    dense = set()
    for i, b in enumerate(rows):
        n = min(RECALL_QUERIES, q.shape[2], group.lengths[i])
        if group.chunks[i] and selection_recall(config, q[i, :, q.shape[2] - n :], k_rot[i, :, group.pad[i] :],
                                                scale) < bound:
            dense.add(b)
    return frozenset(dense)


def selection_recall(config: ShadowKVConfig, q: torch.Tensor, k_rot: torch.Tensor, scale: float) -> float:
    """How well one prompt's landmarks choose its chunks, as ``evaluation.diagnostics`` measures it
    (``mass_recall``, ``selection_mass``): for each of the prompt's last queries ``q [Hq, n, D]``
    (post-RoPE), the exact attention mass (over the prompt's keys ``k_rot [Hkv, T, D]``, causal,
    summed over a KV head's query heads) of the budget's chunks a decode step picks, over that of the
    best chunks of the budget. The mean over KV heads and queries, in [0, 1]."""
    landmarks, selectable = selection_mass.prefill_selection(k_rot, config)
    k = config.select_chunks(selectable.shape[1])
    mass = selection_mass.chunk_mass(q, k_rot, selectable, config.chunk_size, scale)
    picked = selection_mass.picked_chunks(q, landmarks, selectable, k, scale)
    return float(selection_mass.mass_recall(mass, picked, selection_mass.best_chunks(mass, selectable, k)).mean())


def widened_local(state, b: int, tokens: int) -> tuple[torch.Tensor | None, ...]:
    """A prefill's local-window buffers of ``state`` (a LayerState: ``_local_k``, ``_local_v``,
    ``_local_kpre`` ``[B, Hkv, T, D]`` or None, ``_local_valid [B, T]``) widened to ``tokens`` slots
    where shorter, row ``b``'s first ``tokens`` slots valid and its outlier slots not: its whole
    prompt goes to the local window (``LayerState.add_rows`` writes it and rebinds the four)."""
    local, valid = (state._local_k, state._local_v, state._local_kpre), state._local_valid
    if valid.shape[1] < tokens:
        local = tuple(grown(t, 2, tokens) for t in local)
        valid = grown(valid, 1, tokens)
    valid[b, :tokens] = True
    state.outlier_valid[b] = False
    return (*local, valid)


def fallen_back(states, layout: PromptLayout | None) -> list[int]:
    """Indices of the layers (of ``states``, LayerStates) holding some prompt dense that ``layout``
    compresses: listed in ``dense_layers`` or over ``dense_fallback_error``."""
    if layout is None:
        return []
    return [i for i, s in enumerate(states)
            if any(c and not p for p, c in zip(s.prompt_chunks, layout.chunks))]


def fold_schedules(states) -> list:
    """One LayerState per distinct fold schedule: layers whose rows compressed alike fold alike
    (``fold.chunks_due`` reads only token counts), a row kept dense in one layer never folds there."""
    seen: dict[tuple, object] = {}
    for s in states:
        if s.folds:
            seen.setdefault(tuple(s.prompt_chunks), s)
    return list(seen.values())
