"""Gather chosen value chunks into device memory: from pinned host memory (UVA) or from HBM.

One program copies one chunk (``L * D`` contiguous elements) into its slot of ``out``, which may be
a strided slice of the decode step's persistent value buffer. Reading host memory from the kernel
skips the CPU-side ``index_select`` + staging copy (measured on H100: 39-48 GB/s against 0.9-20
GB/s, DESIGN.md §7). The same kernel reads values kept in spare HBM at HBM speed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def gather_chunks_kernel(src, idx, out, reuse, prev, C, K, Hkv, s_ob, s_oh, s_ok,
                         ROW: tl.constexpr, BLOCK: tl.constexpr, REUSE: tl.constexpr):
    i_bh = tl.program_id(0).to(tl.int64)
    i_k = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // Hkv, i_bh % Hkv
    chunk = tl.load(idx + i_bh * K + i_k).to(tl.int64)
    p_src = src + (i_bh * C + chunk) * ROW
    if REUSE:
        # a chunk the previous step fetched is read from its copy on the device, not over PCIe
        slot = tl.load(reuse + i_bh * K + i_k).to(tl.int64)
        if slot >= 0:
            p_src = prev + (i_bh * K + slot) * ROW
    p_out = out + i_b * s_ob + i_h * s_oh + i_k * s_ok
    for start in tl.static_range(0, ROW, BLOCK):
        o_row = start + tl.arange(0, BLOCK)
        m_row = o_row < ROW
        tl.store(p_out + o_row, tl.load(p_src + o_row, mask=m_row), mask=m_row)


def gather_value_chunks(v_chunks: torch.Tensor, chunk_idx: torch.Tensor, device: torch.device,
                        out: torch.Tensor | None = None, reuse: torch.Tensor | None = None,
                        prev: torch.Tensor | None = None) -> torch.Tensor:
    """Triton twin of ``reference.gather_value_chunks``.

    Args:
        v_chunks: ``[B, Hkv, C, L, D]`` contiguous (pinned host memory, or device memory).
        chunk_idx: ``[B, Hkv, k]`` int64 on ``device``.
        out: optional ``[B, Hkv, k*L, D]`` destination on ``device`` whose last two dims are
            contiguous (a slice of a larger buffer along dim 2 is fine).
        reuse, prev: optional ``[B, Hkv, k]`` int64 and contiguous ``[B, Hkv, k*L, D]`` on ``device``:
            where ``reuse >= 0`` the chunk is copied from chunk ``reuse`` of ``prev`` instead.
    Returns:
        ``[B, Hkv, k*L, D]`` on ``device`` (``out`` when given).
    """
    b, hkv, c, l, d = v_chunks.shape
    if not v_chunks.is_contiguous():
        raise ValueError("v_chunks must be contiguous")
    k = chunk_idx.shape[-1]
    idx = chunk_idx.to(device=device, dtype=torch.int64).contiguous()
    if out is None:
        out = torch.empty(b, hkv, k * l, d, dtype=v_chunks.dtype, device=device)
    if tuple(out.shape) != (b, hkv, k * l, d) or out.stride(3) != 1 or out.stride(2) != d or out.dtype != v_chunks.dtype:
        raise ValueError(f"out must be [B, Hkv, k*L, D] = {(b, hkv, k * l, d)} of {v_chunks.dtype} with rows contiguous")
    row = l * d
    has_reuse = reuse is not None
    if has_reuse and (not prev.is_contiguous() or tuple(prev.shape) != (b, hkv, k * l, d) or reuse.shape != idx.shape):
        raise ValueError("reuse must be [B, Hkv, k] and prev a contiguous [B, Hkv, k*L, D]")
    gather_chunks_kernel[(b * hkv, k)](v_chunks, idx, out, reuse if has_reuse else idx, prev if has_reuse else out,
                                       c, k, hkv, out.stride(0), out.stride(1), row,
                                       ROW=row, BLOCK=min(1024, triton.next_power_of_2(row)), REUSE=has_reuse)
    return out
