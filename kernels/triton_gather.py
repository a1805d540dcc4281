"""Gather chosen value chunks into device memory: from pinned host memory (UVA) or from HBM.

One program copies one chunk (``L * D`` contiguous elements) into its slot of ``out``, which may be
a strided slice of the decode step's persistent value buffer. Reading host memory from the kernel
skips the CPU-side ``index_select`` + staging copy (measured on H100: 39-48 GB/s against 0.9-20
GB/s, DESIGN.md §7). The same kernel reads values kept in spare HBM at HBM speed.

8-bit values (``ShadowKVConfig.value_bits=8``, ``quantize.py``) cross PCIe as int8 and are
dequantised here, in registers: each element times its chunk's float32 scale (read from device
memory, one per program), cast to ``out``'s dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def gather_chunks_kernel(src, idx, out, fetch, scale, C, K, Hkv, s_vb, s_sb, s_ob, s_oh, s_ok,
                         ROW: tl.constexpr, BLOCK: tl.constexpr, SOME: tl.constexpr, QUANT: tl.constexpr):
    i_bh = tl.program_id(0).to(tl.int64)
    i_k = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // Hkv, i_bh % Hkv
    chunk = tl.load(idx + i_bh * K + i_k).to(tl.int64)
    # s_vb: 0 where the rows are one document's questions sharing its values (cache_share.repeat_rows)
    p_src = src + i_b * s_vb + (i_h * C + chunk) * ROW
    p_out = out + i_b * s_ob + i_h * s_oh + i_k * s_ok
    if SOME:
        # a slot still holding last step's chunk keeps its values: masked off, nothing crosses PCIe
        end = tl.load(fetch + i_bh * K + i_k).to(tl.int32) * ROW
    else:
        end = ROW
    if QUANT:
        b_scale = tl.load(scale + i_b * s_sb + i_h * C + chunk)
    for start in tl.static_range(0, ROW, BLOCK):
        o_row = start + tl.arange(0, BLOCK)
        m_row = o_row < end
        b_v = tl.load(p_src + o_row, mask=m_row)
        if QUANT:  # float32 product, then one rounding to out's dtype (as naive.gather_fetching)
            b_v = (b_v.to(tl.float32) * b_scale).to(out.dtype.element_ty)
        tl.store(p_out + o_row, b_v, mask=m_row)


def launch_gather_value_chunks(v_chunks: torch.Tensor, idx: torch.Tensor, out: torch.Tensor,
                               fetch: torch.Tensor | None, scales: torch.Tensor | None = None) -> torch.Tensor:
    """Grid and launch of ``gather_chunks_kernel``: one program per chosen chunk (arguments checked
    by ``gather_value_chunks``; ``idx`` int64 and contiguous on ``out``'s device)."""
    b, hkv, c, l, d = v_chunks.shape
    k = idx.shape[-1]
    row = l * d
    gather_chunks_kernel[(b * hkv, k)](v_chunks, idx, out, idx if fetch is None else fetch.contiguous().view(torch.uint8),
                                       idx if scales is None else scales, c, k, hkv, v_chunks.stride(0),
                                       0 if scales is None else scales.stride(0), out.stride(0), out.stride(1), row,
                                       ROW=row, BLOCK=min(1024, triton.next_power_of_2(row)), SOME=fetch is not None,
                                       QUANT=scales is not None)
    return out


def gather_value_chunks(v_chunks: torch.Tensor, chunk_idx: torch.Tensor, device: torch.device,
                        out: torch.Tensor | None = None, fetch: torch.Tensor | None = None,
                        scales: torch.Tensor | None = None) -> torch.Tensor:
    """Triton twin of ``naive.gather_value_chunks`` (and, with ``fetch``, of ``naive.gather_fetching``).

    Args:
        v_chunks: ``[B, Hkv, C, L, D]``, each row contiguous (pinned host memory, or device memory);
            rows may repeat one row through a zero batch stride; int8 when ``scales`` is given.
        chunk_idx: ``[B, Hkv, k]`` int64 on ``device``.
        out: optional ``[B, Hkv, k*L, D]`` destination on ``device`` whose last two dims are
            contiguous (a slice of a larger buffer along dim 2 is fine).
        fetch: optional ``[B, Hkv, k]`` bool on ``device``: only those chunks are written (``out``
            already holds the others).
        scales: optional ``[B, Hkv, C]`` float32 on ``device``, each row contiguous (rows may repeat one
            through a zero batch stride, as ``v_chunks``'): ``v_chunks`` holds int8
            codes, dequantised as ``code * scales[b, h, chunk]`` (``quantize.dequantize``).
    Returns:
        ``[B, Hkv, k*L, D]`` on ``device`` (``out`` when given; else ``v_chunks``' dtype, or
        float32 when dequantised).
    """
    b, hkv, c, l, d = v_chunks.shape
    if not v_chunks[0].is_contiguous():
        raise ValueError("each row of v_chunks must be contiguous")
    k = chunk_idx.shape[-1]
    idx = chunk_idx.to(device=device, dtype=torch.int64).contiguous()
    if scales is not None and (v_chunks.dtype != torch.int8 or tuple(scales.shape) != (b, hkv, c)
                               or scales.dtype != torch.float32 or not scales[0].is_contiguous()):
        raise ValueError(f"scales must be a float32 (rows contiguous) {(b, hkv, c)} beside int8 v_chunks, got "
                         f"{scales.dtype} {tuple(scales.shape)} beside {v_chunks.dtype}")
    dtype = v_chunks.dtype if scales is None else torch.float32
    if out is None:
        out = torch.empty(b, hkv, k * l, d, dtype=dtype, device=device)
    if scales is None and out.dtype != v_chunks.dtype or scales is not None and not out.dtype.is_floating_point:
        raise ValueError(f"out must be of {dtype if scales is None else 'a float dtype'}, got {out.dtype}")
    if tuple(out.shape) != (b, hkv, k * l, d) or out.stride(3) != 1 or out.stride(2) != d:
        raise ValueError(f"out must be [B, Hkv, k*L, D] = {(b, hkv, k * l, d)} with rows contiguous")
    if fetch is not None and (fetch.shape != idx.shape or fetch.dtype != torch.bool):
        raise ValueError("fetch must be a bool [B, Hkv, k]")
    return launch_gather_value_chunks(v_chunks, idx, out, fetch, scales)
