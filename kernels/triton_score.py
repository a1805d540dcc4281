"""Chunk scoring at decode: ``naive.score_chunks`` with one read of the landmarks.

The landmarks (``Hkv * C * D`` elements per sequence, 31 MB per layer at 122K tokens in bf16)
are the only large input, so the work is split in two kernels:

1. ``score_logits_kernel``: one program per (chunk block, query-row block, ``b * Hkv + h``) reads
   a ``[BLOCK_C, D]`` landmark tile in its own dtype and multiplies it with the ``G * n`` query
   rows of KV head ``h`` (all ``G`` heads of the group share the tile read; fp32 accumulation).
   It writes the fp32 logits ``[B, Hkv, G*n, C]`` (``G*n*4`` bytes per chunk against ``D*2`` read)
   and, per row and chunk block, the block's max and sum of ``exp(logit - max)``.
2. ``score_reduce_kernel``: one program per (chunk block, ``b * Hkv + h``) folds the block
   statistics into each row's softmax normaliser, then turns its logits into probabilities,
   sums them over the ``n`` tokens and takes the max over the ``G`` heads.

8-bit landmarks (``ShadowKVConfig.landmark_bits=8``, ``quantize.py``) halve that read: the tile
is loaded as int8 codes, converted exactly to the queries' dtype (``|code| <= 127``) for the same
dot, and each chunk's column of logits is multiplied by its float32 scale after it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# every buffer this module allocates comes from here: tests swap in a NaN-filling allocator so
# an element a kernel fails to write shows up in the result
_scratch = torch.empty
# GPU tile of the logits kernel (chunks per program) and warps per program of both kernels
GPU_TILES = {"block_c": 128, "num_warps": 4}  # best of a sweep on H100 (64-256, 4-8 warps)


@triton.jit
def score_logits_kernel(q, lm, lm_scale, sel, logits, blk_max, blk_sum, scale, n, C, NB, Hkv,
                        s_qb, s_qh, s_qn, s_qd, s_lb, s_lh, s_lc, s_ld,
                        G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                        BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                        QUANT: tl.constexpr):
    i_c = tl.program_id(0)
    i_m = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    i_b = i_bh // Hkv
    i_h = i_bh % Hkv
    GN = G * n
    # query row m of the group is token m % n of query head h*G + m // n
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < GN
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    p_q = (q + i_b * s_qb + (i_h * G + o_m[:, None] // n).to(tl.int64) * s_qh
           + (o_m[:, None] % n).to(tl.int64) * s_qn + o_d[None, :] * s_qd)
    b_q = tl.load(p_q, mask=m_m[:, None] & m_d[None, :], other=0.0)
    # the landmark tile is read transposed ([D, BLOCK_C]) so the dot needs no layout change
    p_lm = lm + i_b * s_lb + i_h * s_lh + o_c[None, :].to(tl.int64) * s_lc + o_d[:, None] * s_ld
    b_lm = tl.load(p_lm, mask=m_d[:, None] & m_c[None, :], other=0.0)
    if UPCAST:  # the CPU interpreter computes bf16 dots wrongly; a GPU keeps the native dtype
        b_q = b_q.to(tl.float32)
    b_lm = b_lm.to(b_q.dtype)  # int8 codes: exact in bf16/fp16/fp32
    if QUANT:
        b_s = tl.load(lm_scale + i_bh * C + o_c, mask=m_c, other=0.0)
        b_l = tl.dot(b_q, b_lm, input_precision=PRECISION) * (b_s * scale)[None, :]
    else:
        b_l = tl.dot(b_q, b_lm, input_precision=PRECISION) * scale
    b_sel = tl.load(sel + i_bh * C + o_c, mask=m_c, other=0) != 0
    b_l = tl.where(b_sel[None, :], b_l, float("-inf"))
    p_out = logits + (i_bh * GN + o_m[:, None]) * C + o_c[None, :]
    tl.store(p_out, b_l, mask=m_m[:, None] & m_c[None, :])
    # block statistics; a block with nothing selectable has max -inf and sum 0 (no -inf - -inf)
    b_max = tl.max(b_l, axis=1)
    b_ref = tl.where(b_max == float("-inf"), 0.0, b_max)
    b_sum = tl.sum(tl.exp(b_l - b_ref[:, None]), axis=1)
    p_stat = (i_bh * GN + o_m) * NB + i_c
    tl.store(blk_max + p_stat, b_max, mask=m_m)
    tl.store(blk_sum + p_stat, b_sum, mask=m_m)


@triton.jit
def score_reduce_kernel(logits, blk_max, blk_sum, sel, out, n, C, NB,
                        G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_NB: tl.constexpr):
    i_c = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    GN = G * n
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C
    o_t = tl.arange(0, BLOCK_N)
    m_t = o_t < n
    b_best = tl.full([BLOCK_C], float("-inf"), tl.float32)
    for g in tl.static_range(G):
        o_row = i_bh * GN + g * n + o_t
        # the row's global max, then its sum of exp over every chunk block (statistics are tiny)
        b_rmax = tl.full([BLOCK_N], float("-inf"), tl.float32)
        for start in range(0, NB, BLOCK_NB):
            o_nb = start + tl.arange(0, BLOCK_NB)
            m_s = m_t[:, None] & (o_nb[None, :] < NB)
            b_m = tl.load(blk_max + o_row[:, None] * NB + o_nb[None, :], mask=m_s, other=float("-inf"))
            b_rmax = tl.maximum(b_rmax, tl.max(b_m, axis=1))
        b_rref = tl.where(b_rmax == float("-inf"), 0.0, b_rmax)
        b_rsum = tl.zeros([BLOCK_N], tl.float32)
        for start in range(0, NB, BLOCK_NB):
            o_nb = start + tl.arange(0, BLOCK_NB)
            m_s = m_t[:, None] & (o_nb[None, :] < NB)
            p_s = o_row[:, None] * NB + o_nb[None, :]
            b_m = tl.load(blk_max + p_s, mask=m_s, other=float("-inf"))
            b_s = tl.load(blk_sum + p_s, mask=m_s, other=0.0)
            b_rsum += tl.sum(b_s * tl.exp(b_m - b_rref[:, None]), axis=1)
        # a row with nothing selectable has sum 0 and only -inf logits: its probabilities come out
        # 0 (reference's nan_to_num) once the division is kept finite
        b_inv = 1.0 / tl.where(b_rsum > 0, b_rsum, 1.0)
        b_l = tl.load(logits + o_row[:, None] * C + o_c[None, :], mask=m_t[:, None] & m_c[None, :],
                      other=float("-inf"))
        b_p = tl.exp(b_l - b_rref[:, None]) * b_inv[:, None]
        b_best = tl.maximum(b_best, tl.sum(b_p, axis=0))
    b_sel = tl.load(sel + i_bh * C + o_c, mask=m_c, other=0) != 0
    tl.store(out + i_bh * C + o_c, tl.where(b_sel, b_best, float("-inf")), mask=m_c)


def launch_score_chunks(q: torch.Tensor, landmarks: torch.Tensor, selectable: torch.Tensor, scale: float,
                        out: torch.Tensor, landmark_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Tiles, scratch buffers, grids and launches of both kernels into ``out [B, Hkv, C]``
    (arguments checked by ``score_chunks``)."""
    b, hq, n, d = q.shape
    hkv, c = landmarks.shape[1], landmarks.shape[2]
    g = hq // hkv
    gpu = q.device.type == "cuda"
    gn = g * n
    # tl.dot wants every tile side >= 16: pad small row counts and head dims with masked lanes
    block_m = max(16, min(64, triton.next_power_of_2(gn)))
    block_d = max(16, triton.next_power_of_2(d))
    block_c = GPU_TILES["block_c"] if gpu else 64
    nb = triton.cdiv(c, block_c)
    logits = _scratch(b, hkv, gn, c, dtype=torch.float32, device=q.device)
    blk_max = _scratch(b, hkv, gn, nb, dtype=torch.float32, device=q.device)
    blk_sum = _scratch(b, hkv, gn, nb, dtype=torch.float32, device=q.device)
    sel = selectable.contiguous().view(torch.uint8)
    score_logits_kernel[(nb, triton.cdiv(gn, block_m), b * hkv)](
        q, landmarks, sel if landmark_scale is None else landmark_scale.contiguous(), sel, logits, blk_max, blk_sum, float(scale),
        n, c, nb, hkv, *q.stride(), *landmarks.stride(),
        G=g, D=d, BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_D=block_d,
        UPCAST=not gpu, PRECISION="ieee" if q.dtype == torch.float32 else "tf32", QUANT=landmark_scale is not None,
        num_warps=GPU_TILES["num_warps"],
    )
    return launch_reduce(logits, blk_max, blk_sum, sel, out, n)


def launch_reduce(logits: torch.Tensor, blk_max: torch.Tensor, blk_sum: torch.Tensor, sel: torch.Tensor,
                  out: torch.Tensor, n: int) -> torch.Tensor:
    """``score_reduce_kernel`` over chunk logits ``[B, Hkv, G*n, C]`` and their block statistics
    ``[B, Hkv, G*n, NB]`` (from ``score_logits_kernel`` or ``triton_code_score``) into ``out [B, Hkv, C]``."""
    b, hkv, gn, c = logits.shape
    nb = blk_max.shape[-1]
    # kernel 2 holds [BLOCK_N, BLOCK_C] tiles: fewer chunks per program when many tokens score at once
    block_n = triton.next_power_of_2(n)
    block_c2 = min(1024 if logits.device.type == "cuda" else 512, triton.next_power_of_2(c), max(16, 8192 // block_n))
    score_reduce_kernel[(triton.cdiv(c, block_c2), b * hkv)](
        logits, blk_max, blk_sum, sel, out, n, c, nb,
        G=gn // n, BLOCK_N=block_n, BLOCK_C=block_c2,
        BLOCK_NB=min(128, triton.next_power_of_2(nb), max(16, 4096 // block_n)), num_warps=4,
    )
    return out


def score_chunks(q: torch.Tensor, landmarks: torch.Tensor, selectable: torch.Tensor, scale: float,
                 landmark_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Triton twin of ``naive.score_chunks``.

    Parameters
    ----------
    q : torch.Tensor
        ``[B, Hq, n, D]`` post-RoPE queries (bf16, fp16 or fp32; any strides).
    landmarks : torch.Tensor
        ``[B, Hkv, C, D]``, same dtype and device as ``q`` (any strides; read in place); int8
        codes when ``landmark_scale`` is given.
    selectable : torch.Tensor
        ``[B, Hkv, C]`` bool; outlier and padding chunks are False.
    scale : float
        Softmax scale applied to ``q . landmark``.
    landmark_scale : torch.Tensor, optional
        ``[B, Hkv, C]`` float32 contiguous: the landmarks are int8 codes, landmark ``c`` being
        ``code * landmark_scale[..., c]`` (``quantize.dequantize``).

    Returns
    -------
    torch.Tensor
        ``[B, Hkv, C]`` float32: per KV head, the max over its ``G = Hq // Hkv`` query heads of the
        softmax over chunks summed over the ``n`` tokens; ``-inf`` where not selectable.
    """
    b, hq, n, d = q.shape
    hkv, c = landmarks.shape[1], landmarks.shape[2]
    if landmarks.shape != (b, hkv, c, d) or hq % hkv:
        raise ValueError(f"q {tuple(q.shape)} and landmarks {tuple(landmarks.shape)} do not match")
    if selectable.shape != (b, hkv, c) or selectable.dtype != torch.bool:
        raise ValueError(f"selectable must be bool {(b, hkv, c)}, got {selectable.dtype} {tuple(selectable.shape)}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q must be float32, float16 or bfloat16, got {q.dtype}")
    if landmark_scale is None and q.dtype != landmarks.dtype:
        raise ValueError(f"q ({q.dtype}) and landmarks ({landmarks.dtype}) must share one float dtype")
    if landmark_scale is not None and (landmarks.dtype != torch.int8 or landmark_scale.shape != (b, hkv, c)
                                       or landmark_scale.dtype != torch.float32):
        raise ValueError(f"landmark_scale must be a float32 {(b, hkv, c)} beside int8 landmarks, got "
                         f"{landmark_scale.dtype} {tuple(landmark_scale.shape)} beside {landmarks.dtype}")
    if q.device != landmarks.device or q.device != selectable.device or (
            landmark_scale is not None and landmark_scale.device != q.device):
        raise ValueError("q, landmarks, landmark_scale and selectable must be on one device")
    out = _scratch(b, hkv, c, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    return launch_score_chunks(q, landmarks, selectable, scale, out, landmark_scale)
