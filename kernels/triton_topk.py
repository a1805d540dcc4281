"""Chunk selection at decode: ``naive.top_chunks`` without a sort.

``torch.topk`` at decode shapes (``[B, Hkv, C]`` scores, C of 4K-16K chunks, k = 256) runs a sort
kernel and a gather kernel, about 53 us per layer on an H100. The rebuild and the value fetch take
the chosen chunks in any order, so only the selected set matters, and that needs no sort:

``top_chunks_kernel``: one program per ``b * Hkv + h`` row holds the row in registers as
order-preserving uint32 keys, finds the k-th largest key by radix select (16 steps of two bits,
one block-wide reduction each), then writes every key above it and enough of those equal to it,
placed by one prefix sum. One launch per layer, fixed output shapes and no host sync, so the
decode step stays one CUDA graph.

One program a row leaves most SMs idle where rows are few and long (122K x 1: 8 rows of 15360 chunks,
53 us a layer in the decode step on an H100, 1.7 ms of a 9.9 ms step). ``segments`` > 1 splits each row:
``segment_top_kernel`` keeps each segment's top ``min(k, segment)`` keys (B * Hkv * S programs), then
``top_chunks_kernel`` selects the row's k among those ``S * min(k, segment)`` candidates (the top k of a
row is the top k of its segments' top k), reading their keys and indices instead of scores.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# every buffer this module allocates comes from here: tests swap in a poisoning allocator so an
# element the kernel fails to write shows up in the result
_scratch = torch.empty
# A program holds its whole row, so warps grow with C (up to max_warps) to keep about
# elems_per_thread keys per thread: ptxas (sm_90a) gives 32 keys a thread 128-168 registers, no
# spills up to 16 warps (C = 16384); 32 warps cap a thread at 64 and spill a little (C = 32768).
# Below min_warps a row's 16 serial reductions run on too few threads: ``kernel_bench.py
# --sweep-topk`` on an H100, B = 4 and 16, graph time per call: C = 4096: 4 warps 18.1 us, 8 warps
# 11.9, 16 12.6, 32 16.5; C = 15616: 4 warps 189 us, 8 83.0, 16 35.6, 32 39.4.
# "segments": a row's programs (1: the one-program kernel alone; > 1 is used only where it shrinks the row,
# S * min(k, segment) < C; "auto": ``auto_segments``, which splits rows of more than "split_above" chunks).
# ``kernel_bench.py --sweep-topk`` on an H100 (benchmarks/results/h100_topk_segments): C = 15360, k = 256:
# one program 39.9 us, 8 segments 17.0; C = 30720, k = 512: 105.4 and 24.1; C = 8192, k = 512: 22.4 and
# 16.7 (4 segments); but C = 4096, k = 256: 11.9 against 13.5 (4), so rows of 4096 stay whole.
GPU_TILES = {"elems_per_thread": 32, "min_warps": 8, "max_warps": 32, "segments": "auto", "split_above": 4096}
# a row is one program's registers and its counts fill 16-bit fields: longer rows (over 256K
# tokens of context at chunk 8) go to torch.topk
MAX_CHUNKS = 32768


@triton.jit
def _score_keys(scores, p_row, s_c, o_c, m_real, BLOCK_C: tl.constexpr):
    """Scores ``p_row + o_c * s_c`` as order-preserving uint32 keys: negatives flip every bit, the rest only the
    sign bit, so unsigned key order is float order. Lanes not ``m_real`` get key 0, below every real key
    (-inf included): virtual slots that fill a row up to k picks."""
    b_s = tl.load(scores + p_row + o_c.to(tl.int64) * s_c, mask=m_real, other=0.0).to(tl.float32)
    b_bits = b_s.to(tl.uint32, bitcast=True)
    b_flip = tl.where(b_bits >= 0x80000000, tl.full([BLOCK_C], 0xFFFFFFFF, tl.uint32),
                      tl.full([BLOCK_C], 0x80000000, tl.uint32))
    return tl.where(m_real, b_bits ^ b_flip, tl.zeros([BLOCK_C], tl.uint32))


@triton.jit
def _select(b_key, b_slot, K):
    """Which lanes hold the K largest keys among the ``b_slot`` lanes (at least K of them; lanes outside have key 0),
    and each picked lane's place ``0..K-1``.

    The k-th largest key, two bits a step from the top: the digit is how many of the candidates
    thresh + j << shift (j = 1, 2, 3) still have K keys at or above them. The three counts share
    one int64 in 16-bit fields (slots <= MAX_CHUNKS < 2**16), so a step costs one block-wide
    reduction. Candidate 0 needs no count: every slot lies at or above it."""
    thresh = tl.zeros([], tl.uint32)
    # keys above the smallest candidate seen with fewer than K at or above it: once the search
    # ends that candidate is thresh + 1, so this is the count of keys strictly above thresh
    n_above = tl.zeros([], tl.int32)
    for step in tl.static_range(16):
        shift = 30 - 2 * step
        b_packed = ((b_key >= thresh + (1 << shift)).to(tl.int64)
                    | ((b_key >= thresh + (2 << shift)).to(tl.int64) << 16)
                    | ((b_key >= thresh + (3 << shift)).to(tl.int64) << 32))
        packed = tl.sum(b_packed, axis=0)
        n1 = (packed & 0xFFFF).to(tl.int32)
        n2 = ((packed >> 16) & 0xFFFF).to(tl.int32)
        n3 = (packed >> 32).to(tl.int32)
        digit = (n1 >= K).to(tl.int32) + (n2 >= K).to(tl.int32) + (n3 >= K).to(tl.int32)
        n_above = tl.where(digit < 3, tl.where(digit == 0, n1, tl.where(digit == 1, n2, n3)), n_above)
        thresh = thresh + (digit.to(tl.uint32) << shift)

    # every key above thresh is picked, and the first K - n_above of those equal to it. One scan
    # ranks each key among the above (low 16 bits) and among the tied (high 16 bits).
    b_above = b_key > thresh
    b_tied = b_slot & (b_key == thresh)
    ties_needed = K - n_above
    b_ranks = tl.cumsum(b_above.to(tl.int32) | (b_tied.to(tl.int32) << 16), axis=0)
    b_tie_rank = (b_ranks >> 16) & 0xFFFF
    b_take = b_above | (b_tied & (b_tie_rank <= ties_needed))
    b_pos = (b_ranks & 0xFFFF) + tl.minimum(b_tie_rank, ties_needed) - 1
    return b_take, b_pos


@triton.jit
def segment_top_kernel(scores, cand_key, cand_idx, C, KS, SEG, S, Hkv, s_b, s_h, s_c, BLOCK_S: tl.constexpr):
    """Program ``(b * Hkv + h) * S + s``: the top ``KS`` keys of segment ``s`` of row ``b, h`` (chunks ``s * SEG`` up
    to ``SEG`` more; those past C are virtual, key 0) to candidates ``s * KS ...`` of the row: keys (int32 bits)
    and chunk indices (0 for a virtual one)."""
    i_p = tl.program_id(0).to(tl.int64)
    i_bh = i_p // S
    i_s = i_p % S
    o_l = tl.arange(0, BLOCK_S)
    o_c = i_s * SEG + o_l
    m_real = (o_l < SEG) & (o_c < C)
    b_key = _score_keys(scores, (i_bh // Hkv) * s_b + (i_bh % Hkv) * s_h, s_c, o_c, m_real, BLOCK_S)
    b_take, b_pos = _select(b_key, o_l < SEG, KS)
    p_out = i_bh * S * KS + i_s * KS + b_pos.to(tl.int64)
    tl.store(cand_key + p_out, b_key.to(tl.int32, bitcast=True), mask=b_take)
    tl.store(cand_idx + p_out, tl.where(m_real, o_c, 0).to(tl.int32), mask=b_take)


@triton.jit
def top_chunks_kernel(scores, out_idx, out_picked, C, K, SLOTS, Hkv, s_b, s_h, s_c, BLOCK_C: tl.constexpr,
                      FROM_KEYS: tl.constexpr = False, cand_idx=None):
    """Row ``b * Hkv + h``'s K picks. ``FROM_KEYS``: the row is ``segment_top_kernel``'s C candidates, ``scores``
    their int32 key bits (rows of C) and ``cand_idx`` their chunk indices."""
    i_bh = tl.program_id(0).to(tl.int64)
    o_c = tl.arange(0, BLOCK_C)
    m_real = o_c < C
    if FROM_KEYS:
        b_key = tl.load(scores + i_bh * C + o_c, mask=m_real, other=0).to(tl.uint32, bitcast=True)
        b_chunk = tl.load(cand_idx + i_bh * C + o_c, mask=m_real, other=0).to(tl.int64)
    else:
        b_key = _score_keys(scores, (i_bh // Hkv) * s_b + (i_bh % Hkv) * s_h, s_c, o_c, m_real, BLOCK_C)
        b_chunk = tl.where(m_real, o_c, 0).to(tl.int64)
    # SLOTS = max(C, K) lanes may be picked: with C < K the first K - C lanes past C are virtual slots
    b_take, b_pos = _select(b_key, o_c < SLOTS, K)
    # finite scores are the keys strictly between those of -inf and +inf (NaNs lie outside); a virtual
    # candidate's key is 0
    b_finite = m_real & (b_key > 0x007FFFFF) & (b_key < 0xFF800000)
    p_out = i_bh * K + b_pos.to(tl.int64)
    tl.store(out_idx + p_out, b_chunk, mask=b_take)
    tl.store(out_picked + p_out, b_finite.to(tl.uint8), mask=b_take)


def _warps(block: int) -> int:
    return min(GPU_TILES["max_warps"], max(GPU_TILES["min_warps"], block // (32 * GPU_TILES["elems_per_thread"])))


def auto_segments(chunks: int, k: int) -> int:
    """Segments a row of ``chunks`` scores splits into for its top ``k``: none up to ``GPU_TILES["split_above"]``
    chunks (one program is as fast there) or where k is a quarter of the row or more; else the power of two nearest
    ``sqrt(chunks / k)``, where a segment's row (``chunks / S``) and the candidates' row (``S * k``) are about as
    long, since each stage's time grows with its row (one program a row, serial reductions)."""
    if k <= 0 or chunks < 4 * k or chunks <= GPU_TILES["split_above"]:
        return 1
    return 1 << round(math.log2(math.sqrt(chunks / k)))


def launch_top_chunks(scores: torch.Tensor, k: int, idx: torch.Tensor, picked: torch.Tensor,
                      num_warps: int | None, segments: int | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Warps, grid and launch of ``top_chunks_kernel`` (after ``segment_top_kernel`` where ``segments`` shrinks the
    row) into ``idx`` and ``picked`` (uint8), as ``top_chunks`` returns them (arguments checked there)."""
    b, hkv, c = scores.shape
    segments = GPU_TILES["segments"] if segments is None else segments
    if segments == "auto":
        segments = auto_segments(c, k)
    seg = triton.cdiv(c, max(segments, 1))
    if segments > 1 and segments * min(k, seg) < c:
        ks = min(k, seg)
        cand = segments * ks
        cand_key = _scratch(b * hkv, cand, dtype=torch.int32, device=scores.device)
        cand_idx = _scratch(b * hkv, cand, dtype=torch.int32, device=scores.device)
        block_s = triton.next_power_of_2(seg)
        segment_top_kernel[(b * hkv * segments,)](
            scores, cand_key, cand_idx, c, ks, seg, segments, hkv, *scores.stride(),
            BLOCK_S=block_s, num_warps=num_warps or _warps(block_s),
        )
        block_c = triton.next_power_of_2(max(cand, k))
        top_chunks_kernel[(b * hkv,)](
            cand_key, idx, picked, cand, k, max(cand, k), hkv, 0, 0, 0,
            BLOCK_C=block_c, FROM_KEYS=True, cand_idx=cand_idx, num_warps=num_warps or _warps(block_c),
        )
        return idx, picked.view(torch.bool)
    block_c = triton.next_power_of_2(max(c, k))
    top_chunks_kernel[(b * hkv,)](
        scores, idx, picked, c, k, max(c, k), hkv, *scores.stride(),
        BLOCK_C=block_c, num_warps=num_warps or _warps(block_c),
    )
    return idx, picked.view(torch.bool)


def top_chunks(scores: torch.Tensor, k: int, *, num_warps: int | None = None,
               segments: int | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``naive.top_chunks``.

    Parameters
    ----------
    scores : torch.Tensor
        ``[B, Hkv, C]`` float32, float16 or bfloat16 (any strides); ``-inf`` marks chunks that must
        not be picked while k finite ones remain. ``max(C, k) <= MAX_CHUNKS``.
    k : int
        Chunks to select per row; may exceed ``C``.
    num_warps : int, optional
        Overrides the ``GPU_TILES`` choice (benchmark sweeps).
    segments : int or "auto", optional
        Programs a row (``segment_top_kernel``; ``"auto"``: ``auto_segments``); overrides ``GPU_TILES["segments"]``.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        ``indices [B, Hkv, k]`` int64, the set ``torch.topk`` selects (any order; among equal
        scores any of them), and ``picked [B, Hkv, k]`` bool, False where the score is not finite.
        Slots beyond ``C`` hold index 0, not picked.
    """
    if scores.dim() != 3 or scores.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"scores must be a float [B, Hkv, C] tensor, got {scores.dtype} {tuple(scores.shape)}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    b, hkv, c = scores.shape
    if max(c, k) > MAX_CHUNKS:
        raise ValueError(f"top_chunks holds a row in one program: max(C={c}, k={k}) > {MAX_CHUNKS}; use torch.topk")
    idx = _scratch(b, hkv, k, dtype=torch.int64, device=scores.device)
    picked = _scratch(b, hkv, k, dtype=torch.uint8, device=scores.device)
    if idx.numel() == 0:
        return idx, picked.view(torch.bool)
    return launch_top_chunks(scores, k, idx, picked, num_warps, segments)
