"""Pick each kernel's implementation: Triton where it helps and runs, the reference otherwise."""
from __future__ import annotations

import functools
import os

import torch

from shadowkv_fx.kernels import reference
from shadowkv_fx.kernels.grouped_attention import grouped_masked_attention


@functools.cache
def triton_available() -> bool:
    if os.environ.get("SHADOWKV_NO_TRITON"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def gather_value_chunks(v_chunks: torch.Tensor, chunk_idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda" and v_chunks.is_pinned() and triton_available():
        from shadowkv_fx.kernels import triton_gather

        return triton_gather.gather_value_chunks(v_chunks, chunk_idx, device)
    return reference.gather_value_chunks(v_chunks, chunk_idx, device)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    return grouped_masked_attention(q, k, v, allowed, scale)
