"""Chunk selection at decode: ``naive.top_chunks`` without a sort.

``torch.topk`` at decode shapes (``[B, Hkv, C]`` scores, C of 4K-16K chunks, k = 256) runs a sort
kernel and a gather kernel, about 53 us per layer on an H100. The rebuild and the value fetch take
the chosen chunks in any order, so only the selected set matters, and that needs no sort:

``top_chunks_kernel``: one program per ``b * Hkv + h`` row holds the row in registers as
order-preserving uint32 keys, finds the k-th largest key by radix select (16 steps of two bits,
one block-wide reduction each), then writes every key above it and enough of those equal to it,
placed by one prefix sum. One launch per layer, fixed output shapes and no host sync, so the
decode step stays one CUDA graph.
"""
from __future__ import annotations

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
GPU_TILES = {"elems_per_thread": 32, "min_warps": 8, "max_warps": 32}
# a row is one program's registers and its counts fill 16-bit fields: longer rows (over 256K
# tokens of context at chunk 8) go to torch.topk
MAX_CHUNKS = 32768


@triton.jit
def top_chunks_kernel(scores, out_idx, out_picked, C, K, SLOTS, Hkv, s_b, s_h, s_c, BLOCK_C: tl.constexpr):
    i_bh = tl.program_id(0).to(tl.int64)
    i_b = i_bh // Hkv
    i_h = i_bh % Hkv
    o_c = tl.arange(0, BLOCK_C)
    m_real = o_c < C
    b_s = tl.load(scores + i_b * s_b + i_h * s_h + o_c.to(tl.int64) * s_c, mask=m_real, other=0.0).to(tl.float32)
    b_bits = b_s.to(tl.uint32, bitcast=True)
    # negatives flip every bit, the rest only the sign bit: unsigned key order is then float order.
    # Lanes past C get key 0, below every real key (-inf included): with C < k the first k - C of
    # them are virtual slots that fill the row up to k picks.
    b_flip = tl.where(b_bits >= 0x80000000, tl.full([BLOCK_C], 0xFFFFFFFF, tl.uint32),
                      tl.full([BLOCK_C], 0x80000000, tl.uint32))
    b_key = tl.where(m_real, b_bits ^ b_flip, tl.zeros([BLOCK_C], tl.uint32))

    # The k-th largest key, two bits a step from the top: the digit is how many of the candidates
    # thresh + j << shift (j = 1, 2, 3) still have k keys at or above them. The three counts share
    # one int64 in 16-bit fields (SLOTS <= MAX_CHUNKS < 2**16), so a step costs one block-wide
    # reduction. Candidate 0 needs no count: SLOTS = max(C, k) keys lie at or above it.
    thresh = tl.zeros([], tl.uint32)
    # keys above the smallest candidate seen with fewer than k at or above it: once the search
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

    # every key above thresh is picked, and the first k - n_above of those equal to it. One scan
    # ranks each key among the above (low 16 bits) and among the tied (high 16 bits).
    b_above = b_key > thresh
    b_tied = (o_c < SLOTS) & (b_key == thresh)
    ties_needed = K - n_above
    b_ranks = tl.cumsum(b_above.to(tl.int32) | (b_tied.to(tl.int32) << 16), axis=0)
    b_tie_rank = (b_ranks >> 16) & 0xFFFF
    b_take = b_above | (b_tied & (b_tie_rank <= ties_needed))
    b_pos = (b_ranks & 0xFFFF) + tl.minimum(b_tie_rank, ties_needed) - 1
    # finite scores are the keys strictly between those of -inf and +inf (NaNs lie outside)
    b_finite = m_real & (b_key > 0x007FFFFF) & (b_key < 0xFF800000)
    p_out = i_bh * K + b_pos.to(tl.int64)
    tl.store(out_idx + p_out, tl.where(m_real, o_c, 0).to(tl.int64), mask=b_take)
    tl.store(out_picked + p_out, b_finite.to(tl.uint8), mask=b_take)


def launch_top_chunks(scores: torch.Tensor, k: int, idx: torch.Tensor, picked: torch.Tensor,
                      num_warps: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Warps, grid and launch of ``top_chunks_kernel`` into ``idx`` and ``picked`` (uint8), as
    ``top_chunks`` returns them (arguments checked there)."""
    b, hkv, c = scores.shape
    block_c = triton.next_power_of_2(max(c, k))
    if num_warps is None:
        num_warps = min(GPU_TILES["max_warps"], max(GPU_TILES["min_warps"],
                                                     block_c // (32 * GPU_TILES["elems_per_thread"])))
    top_chunks_kernel[(b * hkv,)](
        scores, idx, picked, c, k, max(c, k), hkv, *scores.stride(),
        BLOCK_C=block_c, num_warps=num_warps,
    )
    return idx, picked.view(torch.bool)


def top_chunks(scores: torch.Tensor, k: int, *, num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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
    return launch_top_chunks(scores, k, idx, picked, num_warps)
