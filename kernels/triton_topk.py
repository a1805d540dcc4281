"""Chunk selection at decode: ``reference.top_chunks`` without a sort.

``torch.topk`` at decode shapes (``[B, Hkv, C]`` scores, C of 4K-16K chunks, k = 256) runs a sort
kernel and a gather kernel, about 53 us per layer on an H100. The rebuild and the value fetch take
the chosen chunks in any order, so only the selected set matters, and that needs no sort:

``top_chunks_kernel``: one program per ``b * Hkv + h`` row holds the row in registers as
order-preserving uint32 keys, finds the k-th largest key by radix select (``RADIX_BITS`` bits per
step, each step one count of the keys at or above ``2**RADIX_BITS`` candidate thresholds), then
writes every key above it and enough of those equal to it, placed by a prefix sum. One launch per
layer, fixed output shapes and no host sync, so the decode step stays one CUDA graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# every buffer this module allocates comes from here: tests swap in a poisoning allocator so an
# element the kernel fails to write shows up in the result
_scratch = torch.empty
# A program holds its whole row, so warps grow with C (up to max_warps) to keep about
# elems_per_thread keys per thread. radix_bits trades search steps (32 / bits, each ending in a
# block-wide reduction) for candidates counted per step (2**bits compares per key). Guesses from
# an instruction count, not yet a GPU sweep: ``kernel_bench.py --sweep-topk`` times the choices.
GPU_TILES = {"elems_per_thread": 32, "max_warps": 16, "radix_bits": 2}
# a row is one program's registers: beyond this many chunks (over 1M tokens of context) use torch.topk
MAX_CHUNKS = 32768


@triton.jit
def top_chunks_kernel(scores, out_idx, out_picked, C, K, Hkv, s_b, s_h, s_c,
                      BLOCK_C: tl.constexpr, RADIX_BITS: tl.constexpr):
    i_bh = tl.program_id(0).to(tl.int64)
    i_b = i_bh // Hkv
    i_h = i_bh % Hkv
    o_c = tl.arange(0, BLOCK_C)
    m_real = o_c < C
    # with C < k the row gets k - C virtual slots keyed below every real score (-inf included), so
    # exactly k slots are always written
    m_slot = o_c < tl.maximum(C, K)
    b_s = tl.load(scores + i_b * s_b + i_h * s_h + o_c.to(tl.int64) * s_c, mask=m_real,
                  other=float("-inf")).to(tl.float32)
    b_bits = b_s.to(tl.uint32, bitcast=True)
    # negatives flip every bit, the rest only the sign bit: unsigned key order is then float order
    b_flip = tl.where(b_bits >= 0x80000000, tl.full([BLOCK_C], 0xFFFFFFFF, tl.uint32),
                      tl.full([BLOCK_C], 0x80000000, tl.uint32))
    b_key = tl.where(m_real, b_bits ^ b_flip, tl.zeros([BLOCK_C], tl.uint32))

    # the threshold is built from the top digit down: at each step the largest candidate digit that
    # still has at least k keys at or above it (count is monotone in the candidate)
    o_j = tl.arange(0, 1 << RADIX_BITS).to(tl.uint32)
    thresh = tl.zeros([], tl.uint32)
    for step in tl.static_range(32 // RADIX_BITS):
        shift: tl.constexpr = 32 - RADIX_BITS * (step + 1)
        b_cand = thresh + (o_j << shift)
        b_at_least = (b_key[:, None] >= b_cand[None, :]) & m_slot[:, None]
        b_count = tl.sum(b_at_least.to(tl.int32), axis=0)
        digit = tl.sum((b_count >= K).to(tl.int32), axis=0) - 1
        thresh = thresh + (digit.to(tl.uint32) << shift)

    # thresh is now the k-th largest key: fewer than k keys lie above it, ties fill the rest
    b_above = m_slot & (b_key > thresh)
    b_tied = m_slot & (b_key == thresh)
    ties_needed = K - tl.sum(b_above.to(tl.int32), axis=0)
    b_take = b_above | (b_tied & (tl.cumsum(b_tied.to(tl.int32), axis=0) <= ties_needed))
    b_pos = tl.cumsum(b_take.to(tl.int32), axis=0) - 1
    # finite scores are the keys strictly between those of -inf and +inf (NaNs lie outside): the
    # scores themselves need not stay live in registers through the search
    b_finite = m_real & (b_key > 0x007FFFFF) & (b_key < 0xFF800000)
    p_out = i_bh * K + b_pos.to(tl.int64)
    tl.store(out_idx + p_out, tl.where(m_real, o_c, 0).to(tl.int64), mask=b_take)
    tl.store(out_picked + p_out, b_finite.to(tl.uint8), mask=b_take)


def top_chunks(scores: torch.Tensor, k: int, *, radix_bits: int | None = None,
               num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``reference.top_chunks``.

    Parameters
    ----------
    scores : torch.Tensor
        ``[B, Hkv, C]`` float32, float16 or bfloat16 (any strides); ``-inf`` marks chunks that must
        not be picked while k finite ones remain. ``C <= MAX_CHUNKS``.
    k : int
        Chunks to select per row; may exceed ``C``.
    radix_bits, num_warps : int, optional
        Overrides of the ``GPU_TILES`` choices (benchmark sweeps).

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
    if c > MAX_CHUNKS:
        raise ValueError(f"top_chunks holds a row in one program: C={c} > {MAX_CHUNKS}; use torch.topk")
    radix_bits = radix_bits or GPU_TILES["radix_bits"]
    if radix_bits not in (1, 2, 4, 8):
        raise ValueError(f"radix_bits must divide 32 and be at most 8, got {radix_bits}")
    idx = _scratch(b, hkv, k, dtype=torch.int64, device=scores.device)
    picked = _scratch(b, hkv, k, dtype=torch.uint8, device=scores.device)
    if idx.numel() == 0:
        return idx, picked.view(torch.bool)
    block_c = triton.next_power_of_2(max(c, k))
    if num_warps is None:
        num_warps = min(GPU_TILES["max_warps"], max(4, block_c // (32 * GPU_TILES["elems_per_thread"])))
    top_chunks_kernel[(b * hkv,)](
        scores, idx, picked, c, k, hkv, *scores.stride(),
        BLOCK_C=block_c, RADIX_BITS=radix_bits, num_warps=num_warps,
    )
    return idx, picked.view(torch.bool)
