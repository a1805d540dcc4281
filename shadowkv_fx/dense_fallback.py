"""Dense fallback: a layer (``ShadowKVConfig.dense_layers``) or a layer's prompt whose keys the
low-rank basis fits badly (``ShadowKVConfig.dense_fallback_error``) is kept whole on the device and
attended densely, through the path a prompt too short to compress already takes (``prompt_chunks[b]
== 0``: the whole prompt in the local window, no selection, no fold).

Why that path: the decode step, the CUDA graph and the compiled decoder layer stay as they are; a
layer's state only differs in its buffer widths and flags, which the ShadowKV op reads at run time
(one compiled region serves every layer; no new graph shape reaches it).

Why per row for the measured bound: the fit error is a property of one prompt's keys in one layer,
and prefill compresses a batch a group of rows at a time (``prefill_rows``), so when a later group's
prompt fails the bound the earlier rows are already compressed and their dense keys gone. A failing
row is kept dense on its own (its layer's local window widens to hold it, prefill-only buffers, before
the decode buffers are built); the other rows stay compressed. Listed layers are dense for every row,
decided before anything is allocated, so such a layer keeps no compressed store at all.

Why ``fit_err``: prefill computes it anyway (``kernels/compression.compress_prompt``), so the
measurement costs one device read per layer and prompt. Landmark flatness and recall against exact
attention (``evaluation/diagnostics.py``) need the decode queries, which prefill does not have.
"""
from __future__ import annotations

import torch

from shadowkv_fx.config import ShadowKVConfig
from shadowkv_fx.kernels import compression
from shadowkv_fx.pinned import grown
from shadowkv_fx.prompt_layout import PromptLayout


def check_layers(config: ShadowKVConfig, num_layers: int) -> None:
    """``ValueError`` naming the fix when ``dense_layers`` names a layer the model does not have."""
    missing = [i for i in config.dense_layers if i >= num_layers]
    if missing:
        raise ValueError(f"ShadowKVConfig.dense_layers names layers {missing} but the model has {num_layers} "
                         f"(0 to {num_layers - 1}): drop them")


def layer_layout(config: ShadowKVConfig, layer_idx: int, layout: PromptLayout) -> PromptLayout:
    """The layout layer ``layer_idx`` compresses: ``layout`` itself, or for a dense layer every
    prompt uncompressed (``chunks`` 0), so its state is built as a short prompt's is."""
    if layer_idx not in config.dense_layers:
        return layout
    return PromptLayout(layout.pad, layout.lengths, [0] * len(layout.lengths), layout.padded_len)


def compressed(config: ShadowKVConfig, k_pre: torch.Tensor, k_rot: torch.Tensor,
               v: torch.Tensor) -> compression.CompressedPrompt | None:
    """One prompt's chunked keys and values (``[Hkv, C*L, D]``) compressed, or None where the basis
    fits its keys with a relative error above ``dense_fallback_error``: the prompt stays dense."""
    c = compression.compress_prompt(k_pre, k_rot, v, config.rank, config.chunk_size, config.outlier_chunks)
    bound = config.dense_fallback_error
    return None if bound is not None and float(c.fit_err) > bound else c


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
