"""Attention at prefill: dense and causal per sequence, over a prompt that may go through the
model in pieces (``prefill_chunk_size``) and groups of rows (``prefill_rows``); the cache
compresses each layer once a group's whole prompt has passed."""
from __future__ import annotations

import torch
from torch.nn.attention.bias import causal_lower_right

from shadowkv_fx.prompt_layout import PromptLayout


def stage_piece(staged: dict[int, tuple[torch.Tensor, ...]], layer_idx: int, span: tuple[int, int], total: int,
                parts: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Append one piece's ``parts`` (keys, values and RoPE inputs ``[rows, *, span, *]`` of the
    padded prompt's columns ``span``) to the layer's prompt so far, held in ``staged`` until the
    last piece (of ``total`` columns); return the prompt so far."""
    start, end = span
    if start == 0 and end == total:
        return parts
    if start == 0:
        staged[layer_idx] = tuple(t.new_empty(*t.shape[:2], total, t.shape[3]) for t in parts)
    buffers = staged[layer_idx]
    for buf, part in zip(buffers, parts):
        buf[:, :, start:end] = part
    if end == total:
        del staged[layer_idx]
    return tuple(buf[:, :, :end] for buf in buffers)


def dense_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PromptLayout, scale: float,
                  start: int = 0) -> torch.Tensor:
    """Causal attention per sequence over its real tokens; pad rows are zero (never read).

    ``q [B, Hq, n, D]`` holds padded-prompt columns ``[start, start + n)``; ``k, v [B, Hkv, start + n, D]``.
    """
    out = torch.zeros_like(q)
    group = q.shape[1] // k.shape[1]
    end = k.shape[2]
    for b, pad in enumerate(layout.pad):
        first = max(pad, start)
        if first >= end:
            continue
        # explicit head repeat: SDPA's flash kernel takes no GQA, and the math fallback would
        # materialise S x S scores per head
        kb = k[b : b + 1, :, pad:].repeat_interleave(group, dim=1)
        vb = v[b : b + 1, :, pad:].repeat_interleave(group, dim=1)
        qb = q[b : b + 1, :, first - start :]
        if first == pad:
            attended = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale)
        else:
            # a later piece of the prompt: SDPA's is_causal aligns top-left, the piece sits bottom-right.
            # A lower-right causal bias runs flash attention as it is; an explicit [piece, prompt]
            # mask goes to a masked kernel that reads a mask that size (the likely cause, not timed
            # apart, of the H100 serving run's 22.5 s from a 122K document's admission in pieces of
            # 4096 to its first token, against 10.8 s for a prefill in one piece)
            mask = causal_lower_right(qb.shape[2], kb.shape[2])
            attended = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale)
        out[b : b + 1, :, first - start :] = attended
    return out
