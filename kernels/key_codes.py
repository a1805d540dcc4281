"""4-bit per-key codes that rank chunks (``ShadowKVConfig.key_code_bits=4``, issue #32).

Each post-RoPE key is rounded to 4 bits per channel, the channel scaled by its min and max over
the row's prompt (one ``step`` and ``low`` per KV head and channel: ``key ~= code * step + low``).
One scale for the whole prompt rather than KIVI's groups of 32 tokens: it scored as well on the
2K copying suite (``benchmarks/results/cpu_selection_ceiling``: 31.7 against 31.6), and a fold
codes its new chunks with the prompt's scales (clamped), so no group straddles a fold.

A chunk's codes sit in its landmark row, packed two to a byte: byte ``i`` of a token holds channel
``i`` in its low nibble and channel ``i + D/2`` in its high one, so a kernel dots the two halves
of the query with the two nibbles. Plain torch, run at prefill and at folds (not per step).

Shapes: ``Hkv`` KV heads, ``C`` chunks, ``L`` chunk size, ``D`` head dim (even).
"""
from __future__ import annotations

import torch

LEVELS = 15  # 4 bits: codes 0..15


def fit_scale(k_rot: torch.Tensor) -> torch.Tensor:
    """``k_rot [..., T, D]`` -> ``[..., 2, D]`` float32: each channel's ``step`` and ``low`` over the T keys."""
    keys = k_rot.float()
    low, high = keys.amin(-2), keys.amax(-2)
    step = ((high - low) / LEVELS).clamp_min(1e-8)
    return torch.stack([step, low], dim=-2)


def encode(k_rot: torch.Tensor, code_scale: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Keys ``[..., C*L, D]`` as packed codes ``[..., C, L*D/2]`` uint8 under ``code_scale [..., 2, D]``
    (keys outside the scale's range, a fold's, take the nearest code)."""
    *lead, t, d = k_rot.shape
    if d % 2 or t % chunk_size:
        raise ValueError(f"keys [{t}, {d}]: codes need an even head dim and whole chunks of {chunk_size}")
    step, low = code_scale[..., 0:1, :], code_scale[..., 1:2, :]
    codes = ((k_rot.float() - low) / step).round().clamp(0, LEVELS).to(torch.uint8)
    packed = codes[..., : d // 2] | (codes[..., d // 2 :] << 4)
    return packed.reshape(*lead, t // chunk_size, chunk_size * d // 2)


def decode(codes: torch.Tensor, code_scale: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Packed codes ``[..., C, L*D/2]`` -> the keys they stand for, ``[..., C*L, D]`` float32."""
    *lead, c, width = codes.shape
    tokens = codes.reshape(*lead, c * chunk_size, width // chunk_size)
    unpacked = torch.cat([tokens & 15, tokens >> 4], dim=-1).float()
    return unpacked * code_scale[..., 0:1, :] + code_scale[..., 1:2, :]
