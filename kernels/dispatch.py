"""Pick each kernel's implementation: Triton on CUDA tensors when Triton is installed, its
plain-PyTorch twin (``naive.py``) otherwise (CPU models, tests, ``SHADOWKV_NO_TRITON=1``)."""
from __future__ import annotations

import functools
import os
from typing import Callable

import torch

from shadowkv_fx.kernels import compression, naive
from shadowkv_fx.kernels.grouped_attention import grouped_masked_attention
from shadowkv_fx.kernels.rope_forms import FORMS


@functools.cache
def triton_available() -> bool:
    if os.environ.get("SHADOWKV_NO_TRITON"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" and triton_available()


def score_chunks(q: torch.Tensor, landmarks: torch.Tensor, selectable: torch.Tensor, scale: float,
                 landmark_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Chunk scores ``[B, Hkv, C]``; ``landmark_scale``: the landmarks are int8 codes with these scales."""
    if _triton(q):
        from shadowkv_fx.kernels import triton_score

        return triton_score.score_chunks(q, landmarks, selectable, scale, landmark_scale)
    return naive.score_chunks(q, landmarks, selectable, scale, landmark_scale)


def score_code_chunks(q: torch.Tensor, codes: torch.Tensor, code_scale: torch.Tensor, selectable: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """Chunk scores ``[B, Hkv, C]`` from 4-bit per-key codes (``key_codes.py``)."""
    if _triton(q):
        from shadowkv_fx.kernels import triton_code_score

        if triton_code_score.supports(2 * codes.shape[-1] // q.shape[-1], q.shape[-1]):
            return triton_code_score.score_code_chunks(q, codes, code_scale, selectable, scale)
    return naive.score_code_chunks(q, codes, code_scale, selectable, scale)


def top_chunks(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    if _triton(scores):
        from shadowkv_fx.kernels import triton_topk

        if max(scores.shape[-1], k) <= triton_topk.MAX_CHUNKS:
            return triton_topk.top_chunks(scores, k)
    return naive.top_chunks(scores, k)


def rebuild_rope_keys(u: torch.Tensor, sv: torch.Tensor, chunk_idx: torch.Tensor, chunk_size: int, pad: torch.Tensor,
                      rope_tables: list[torch.Tensor], rope_form: str, rope_fn: Callable, out: torch.Tensor) -> None:
    """Post-RoPE keys of the chosen chunks into ``out [B, Hkv, k*L, D]``.

    One fused kernel when the site's RoPE is a recognised form; else the low-rank rebuild, then the
    model's own RoPE function at the chunks' original positions.
    """
    if _triton(u) and rope_form in FORMS:
        from shadowkv_fx.kernels import triton_rebuild

        cos, sin = rope_tables
        triton_rebuild.rebuild_rope_keys(u, sv, chunk_idx, chunk_size, pad, cos, sin, rope_form, out=out)
        return
    token_idx = compression.chunk_tokens(chunk_idx, chunk_size)
    k_pre = naive.rebuild_keys(u, sv, token_idx)
    # picks of a shorter sequence's padding chunks point past its prompt; they are masked later
    positions = (token_idx + pad[:, None, None]).clamp(max=rope_tables[0].shape[2] - 1)
    tables = [naive.gather_positions(t, positions) for t in rope_tables]
    out.copy_(rope_fn(k_pre, *tables))


def rotates_like_flag(k_pre: torch.Tensor, k_rot: torch.Tensor, tables: list[torch.Tensor], rope_form: str,
                      sample: int = 64) -> torch.Tensor | None:
    """Whether ``append_rope`` can stand in for the model's key RoPE, as a device bool scalar (no host sync), or None
    where it cannot without a look: a Triton device and a known form that reproduces ``k_rot`` bit for bit on the last
    ``sample`` prompt tokens.

    ``k_pre, k_rot: [1, Hkv, S, D]``; ``tables``: ``[1, 1, S, c]`` each, aligned with them.
    """
    if not _triton(k_pre) or rope_form not in FORMS or len(tables) != 2 or k_rot.dtype != k_pre.dtype:
        return None
    from shadowkv_fx.kernels import triton_append

    n = min(sample, k_pre.shape[2])
    cos, sin = (t[:, :, t.shape[2] - n :] for t in tables)
    return triton_append.rotates_like_flag(k_pre[:, :, -n:], k_rot[:, :, -n:], cos, sin, rope_form)


def append_rope(k_pre: torch.Tensor, v: torch.Tensor, tables: list[torch.Tensor], rope_form: str,
                k_buf: torch.Tensor, v_buf: torch.Tensor, fill: torch.Tensor, base: int,
                pre_k: torch.Tensor | None, pre_base: int) -> None:
    """New tokens rotated into ``k_buf`` (and, with ``pre_k``, kept unrotated there) with their
    values into ``v_buf``, at slots ``base + fill + i``: one kernel (only where ``rotates_like_flag``)."""
    from shadowkv_fx.kernels import triton_append

    cos, sin = tables
    triton_append.append_rope(k_pre, v, cos, sin, rope_form, k_buf, v_buf, fill, base, pre_k, pre_base)


def gather_value_chunks(v_chunks: torch.Tensor, chunk_idx: torch.Tensor, device: torch.device,
                        out: torch.Tensor | None = None, fetch: torch.Tensor | None = None,
                        scales: torch.Tensor | None = None) -> torch.Tensor:
    """Values of the chosen chunks into ``out``; with ``fetch``, only those chunks (``out`` holds
    the others since an earlier step: they do not cross PCIe again); with ``scales``, int8 codes
    dequantised on the way."""
    if device.type == "cuda" and (v_chunks.is_pinned() or v_chunks.device.type == "cuda") and triton_available():
        from shadowkv_fx.kernels import triton_gather

        return triton_gather.gather_value_chunks(v_chunks, chunk_idx, device, out, fetch, scales)
    if fetch is not None:
        return naive.gather_fetching(v_chunks, chunk_idx, fetch, out, scales)
    values = naive.gather_value_chunks(v_chunks, chunk_idx, device, scales)
    return values if out is None else out.copy_(values)


def decode_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, key_valid: torch.Tensor,
                     tail_start: int, tail_fill: torch.Tensor, scale: float,
                     tail_first: torch.Tensor | None = None) -> torch.Tensor:
    if _triton(q):
        from shadowkv_fx.kernels import triton_decode_attention

        return triton_decode_attention.decode_attention(q, k_buf, v_buf, key_valid, tail_start, tail_fill, scale,
                                                        tail_first=tail_first)
    # the naive twin's mask, with GQA query heads as rows instead of K/V copied per head
    mask = naive.decode_mask(key_valid, k_buf.shape[2], tail_start, tail_fill, q.shape[2], tail_first)
    return grouped_masked_attention(q, k_buf, v_buf, mask, scale)
