"""Decode attention for grouped-query models without copying K/V per query head.

``naive.masked_attention`` repeats every key and value ``G = Hq / Hkv`` times so plain SDPA
can run; at decode that copy is most of the step's memory traffic. Here the ``G`` query heads of
a KV head become ``G * n`` query rows against that head's keys: the same softmax per row, one read
of K and V.
"""
from __future__ import annotations

import torch


def grouped_masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                             scale: float) -> torch.Tensor:
    """Same contract as ``naive.masked_attention``.

    Args:
        q: ``[B, Hq, n, D]``; k, v: ``[B, Hkv, N, D]`` (query head ``h`` reads KV head ``h // G``).
        allowed: bool, broadcastable to ``[B, Hkv, n, N]``; every query row must allow one key.
    Returns:
        ``[B, Hq, n, Dv]``.
    """
    b, hq, n, d = q.shape
    hkv, keys = k.shape[1], k.shape[2]
    group = hq // hkv
    mask = allowed.expand(b, hkv, n, keys)
    if group > 1:
        q = q.reshape(b, hkv, group * n, d)
        mask = mask.unsqueeze(2).expand(b, hkv, group, n, keys).reshape(b, hkv, group * n, keys)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.reshape(b, hq, n, v.shape[-1])
