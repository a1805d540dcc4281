"""Chunk scoring from 4-bit per-key codes (``ShadowKVConfig.key_code_bits=4``): ``naive.score_code_chunks``
with one read of the codes.

``code_logits_kernel``: one program per (chunk block, query-row block, ``b * Hkv + h``) reads the
packed codes of ``BLOCK_C`` chunks (``BLOCK_C * L`` tokens of ``D/2`` bytes, transposed), splits each
byte into its two nibbles and dots them with the two halves of the ``G * n`` query rows of KV head
``h``, each query channel scaled by its code step first (``(q * step) . code``). The keys' ``q . low``
is one constant per query row, which the softmax over chunks cancels, so it is never formed. A
chunk's logit is the log-sum-exp of its ``L`` token logits, and the kernel writes chunk logits and
block statistics exactly as ``triton_score.score_logits_kernel`` does, so ``score_reduce_kernel``
(softmax over chunks, sum over tokens, max over the group) runs unchanged: the chunk's softmax
weight is then the sum of its tokens' attention weights.

Codes 0..15 are exact in fp16; the scaled queries are rounded to fp16 for the tensor-core dot on a
GPU (fp32 under the CPU interpreter, or for fp32 models). ``GPU_TILES["dot"]`` picks how a 16-bit model's
codes meet the tensor cores:

- ``"fp16"``: each nibble converted to fp16 (the form that passed the GPU suite; two conversions a byte);
- ``"fp16_bits"``: each nibble made fp16 by bits, ``0x6400 | code`` (1024 + code), no conversion;
- ``"int8x2"``: the codes stay integers (int8 dots, int32 sums); each query row is split into two int8
  parts, ``q ~ s1 * q1 + s2 * q2`` with ``s2 = s1 / 254`` (a residual under 1/64516 of the row's largest
  channel), and a token's logit is ``s2 * (254 * q1.code + q2.code)``: one conversion a logit, none a code;
- ``"fp16_tokens"``, ``"int8x2_tokens"``: those dots turned around, the codes as read (token-major) the dots'
  rows and the few query rows its columns;
- ``"fp16_asm"``: ``fp16_bits`` in PTX, four codes a register (``prmt`` + ``and``: two instructions a pair of codes
  against ~4 integer instructions a code for Triton's lowering, which bound the kernel on the H100), the high
  nibble read in place as 16 * code, and each chunk's log-sum-exp in base 2 with one ``ex2.approx.ftz`` a token;
- ``"fp16_asm_phases"``: ``fp16_asm`` with consecutive tokens folded into the dot's padded query rows
  (``_chunk_logits_phases``): every row real, a quarter of the exps at G = 4.

Measured on the H100 (``benchmarks/results/h100_code_tiles``): 24 us a layer for 16-bit landmarks at 32K x 4,
codes 74 us (fp16), 66 (fp16_bits), 67 (int8x2), 94-207 (turned around), 58 (fp16_asm); a program looping over
16 blocks of tokens, software-pipelined in 3 stages, takes fp16_asm to 50 us and fp16_asm_phases to 46
(``benchmarks/results/h100_code_phases``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from shadowkv_fx.kernels import triton_score

# tokens a block (BLOCK_C * L), warps, dot form, blocks a program and their pipeline stages: the H100's fastest exact
# tiles (score_kernel_sweep.py, sessions 13-15: fp16_asm_phases 45.9 us a layer at 32K x 4, fp16_asm 50-51, the phases
# form turned around 50.9, fp16_bits' one block 66); set from a sweep's BEST.json by scripts/set_code_tiles.py
GPU_TILES = {"block_t": 128, "num_warps": 4, "dot": "fp16_asm_phases", "blocks": 16, "stages": 3}
LOG2E = tl.constexpr(1.4426950408889634)  # the ASM forms' logits in base 2, their log-sum-exps back in natural units
LN2 = tl.constexpr(0.6931471805599453)
# name: (dot form, codes as the dots' rows)
DOT_FORMS = {"fp16": (0, False), "fp16_bits": (1, False), "int8x2": (2, False), "fp16_tokens": (0, True),
             "int8x2_tokens": (2, True), "fp16_asm": (3, False), "fp16_asm_phases": (4, False),
             "fp16_asm_phases_tokens": (4, True)}
# the GPU's dots (GPU_TILES['dot']) off a GPU (the interpreter) only where a test asks for them
GPU_DOTS_OFF_GPU = False


@triton.jit
def _fp16_nibble(b):
    """Codes 0..15 (uint8) as the fp16 bits ``0x6400 | code``, 1024 + code exactly: integer ops and a bitcast, no
    int-to-float conversion (quarter rate on Hopper, two a byte). Kept 16 bits wide before the bitcast: a uint16
    OR an int literal widens to int32 (the likely reason the first try did not compile on the H100)."""
    bits = b.to(tl.uint16) | tl.full(b.shape, 0x6400, tl.uint16)
    return bits.to(tl.float16, bitcast=True)


@triton.jit
def _fp16_low_nibbles_asm(b):
    """``_fp16_nibble(b & 15)`` in PTX, four bytes a register: a ``prmt`` spreads two bytes under the exponent byte
    0x64 (fp16 1024 + byte) and one ``and`` keeps the low nibble: two instructions a pair of codes (Hopper's
    profile of the Triton lowering: PRMT, LOP3 and SHF took ~4 integer instructions a code, the kernel's bound)."""
    return tl.inline_asm_elementwise(
        "{ .reg .b32 t0, t1; prmt.b32 t0, $2, 0x64646464, 0x5150; prmt.b32 t1, $2, 0x64646464, 0x5352;"
        " and.b32 $0, t0, 0x640F640F; and.b32 $1, t1, 0x640F640F; }",
        "=r,=r,r", [b], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def _fp16_high_nibbles_asm(b):
    """``_fp16_nibble(b & 0xF0)``: the high nibble left in place, 1024 + 16 * code (its query half scaled by 1/16)."""
    return tl.inline_asm_elementwise(
        "{ .reg .b32 t0, t1; prmt.b32 t0, $2, 0x64646464, 0x5150; prmt.b32 t1, $2, 0x64646464, 0x5352;"
        " and.b32 $0, t0, 0x64F064F0; and.b32 $1, t1, 0x64F064F0; }",
        "=r,=r,r", [b], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def _fp16_nibble_pair(b, ASM: tl.constexpr):
    """Packed codes as fp16 ``(1024 + low nibble, 1024 + 16 * high nibble)``: in PTX on a GPU (``ASM``), by the same
    bits in Triton ops under the interpreter."""
    if ASM:
        return _fp16_low_nibbles_asm(b), _fp16_high_nibbles_asm(b)
    else:
        return _fp16_nibble(b & 15), _fp16_nibble(b & 0xF0)


@triton.jit
def _exp2(x, ASM: tl.constexpr):
    """``2 ** x``, one MUFU.EX2 on a GPU (``tl.exp2`` adds a range fix for subnormal results, which a softmax over
    logits never needs)."""
    if ASM:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return tl.exp2(x)


@triton.jit
def _chunk_logits_fp16_asm(b_qlo, b_qhi, b_k, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, L: tl.constexpr,
                           ASM: tl.constexpr):
    """The ``"fp16_asm"`` form: ``b_qlo``, ``b_qhi`` arrive scaled by log2(e) (``b_qhi`` also by 1/16), the nibbles
    are made fp16 by ``_fp16_nibble_pair`` and each chunk's log-sum-exp runs in base 2; chunk logits come back in
    natural units."""
    lo, hi = _fp16_nibble_pair(b_k, ASM)
    b_l = tl.dot(b_qlo.to(tl.float16), lo) + tl.dot(b_qhi.to(tl.float16), hi)
    b_l3 = tl.reshape(b_l, (BLOCK_M, BLOCK_C, L))
    b_top = tl.max(b_l3, axis=2)
    return (b_top + tl.log2(tl.sum(_exp2(b_l3 - b_top[:, :, None], ASM), axis=2))) * LN2


@triton.jit
def _int8_parts(x, s1, s2):
    """``x ~ s1 * q1 + s2 * q2`` with ``q1, q2`` int8 (``s1``, ``s2``: one per row, ``[BLOCK_M, 1]``)."""
    q1 = tl.floor(x / s1 + 0.5)
    q2 = tl.minimum(tl.maximum(tl.floor((x - q1 * s1) / s2 + 0.5), -127.0), 127.0)
    return q1.to(tl.int8), q2.to(tl.int8)


@triton.jit
def _int8x2_query(b_qlo, b_qhi):
    """The scaled query halves ``[BLOCK_M, BLOCK_H]`` as int8 parts ``(q1lo, q2lo, q1hi, q2hi)`` and each row's
    ``s2`` ``[BLOCK_M]``: ``q ~ 254 * s2 * q1 + s2 * q2``."""
    top = tl.maximum(tl.max(tl.abs(b_qlo), axis=1), tl.max(tl.abs(b_qhi), axis=1))
    s1 = tl.where(top > 0, top / 127.0, 1.0)
    s2 = s1 / 254.0
    q1lo, q2lo = _int8_parts(b_qlo, s1[:, None], s2[:, None])
    q1hi, q2hi = _int8_parts(b_qhi, s1[:, None], s2[:, None])
    return q1lo, q2lo, q1hi, q2hi, s2


@triton.jit
def _int8x2_logits(b_qlo, b_qhi, b_k):
    """Token logits ``[BLOCK_M, BLOCK_T]`` of the scaled query halves against packed codes ``[BLOCK_H, BLOCK_T]``."""
    q1lo, q2lo, q1hi, q2hi, s2 = _int8x2_query(b_qlo, b_qhi)
    klo, khi = (b_k & 15).to(tl.int8), (b_k >> 4).to(tl.int8)
    d1 = tl.dot(q1lo, klo, out_dtype=tl.int32) + tl.dot(q1hi, khi, out_dtype=tl.int32)
    d2 = tl.dot(q2lo, klo, out_dtype=tl.int32) + tl.dot(q2hi, khi, out_dtype=tl.int32)
    # |d1| <= 127 * 15 * D: 254 * d1 + d2 stays within int32 for any head dim up to 4096
    return (d1 * 254 + d2).to(tl.float32) * s2[:, None]


@triton.jit
def _int8x2_token_logits(b_qlo, b_qhi, b_kt):
    """``_int8x2_logits`` with the codes as the dots' rows: ``[BLOCK_T, BLOCK_M]`` from codes ``[BLOCK_T, BLOCK_H]``
    (token-major, as stored)."""
    q1lo, q2lo, q1hi, q2hi, s2 = _int8x2_query(b_qlo, b_qhi)
    klo, khi = (b_kt & 15).to(tl.int8), (b_kt >> 4).to(tl.int8)
    d1 = tl.dot(klo, tl.trans(q1lo), out_dtype=tl.int32) + tl.dot(khi, tl.trans(q1hi), out_dtype=tl.int32)
    d2 = tl.dot(klo, tl.trans(q2lo), out_dtype=tl.int32) + tl.dot(khi, tl.trans(q2hi), out_dtype=tl.int32)
    return (d1 * 254 + d2).to(tl.float32) * s2[None, :]


@triton.jit
def _chunk_logits_codes_as_columns(b_qlo, b_qhi, p_k, o_h, m_h, m_t, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                                   L: tl.constexpr, FAST_DOT: tl.constexpr, DOT_FORM: tl.constexpr, ASM: tl.constexpr):
    """Chunk logits ``[BLOCK_M, BLOCK_C]``, the query rows the dots' rows and the codes transposed
    (``[BLOCK_H, BLOCK_T]``): each chunk's log-sum-exp of its ``L`` token logits (finite: padding keys have codes 0)."""
    b_k = tl.load(p_k[None, :] + o_h[:, None], mask=m_h[:, None] & m_t[None, :], other=0)
    if FAST_DOT and DOT_FORM >= 3:  # fp16_asm (and fp16_asm_phases where no phases fit)
        b_cl = _chunk_logits_fp16_asm(b_qlo, b_qhi, b_k, BLOCK_M, BLOCK_C, L, ASM)
    else:
        if FAST_DOT and DOT_FORM == 2:
            b_l = _int8x2_logits(b_qlo, b_qhi, b_k)
        elif FAST_DOT and DOT_FORM == 1:  # each nibble read as 1024 + code; the 1024s add a per-row constant (cancelled)
            b_l = (tl.dot(b_qlo.to(tl.float16), _fp16_nibble(b_k & 15))
                   + tl.dot(b_qhi.to(tl.float16), _fp16_nibble(b_k >> 4)))
        elif FAST_DOT:  # fp16 operands at the default precision, the form that passed the GPU suite
            b_l = (tl.dot(b_qlo.to(tl.float16), (b_k & 15).to(tl.float16))
                   + tl.dot(b_qhi.to(tl.float16), (b_k >> 4).to(tl.float16)))
        else:
            b_l = (tl.dot(b_qlo, (b_k & 15).to(tl.float32), input_precision="ieee")
                   + tl.dot(b_qhi, (b_k >> 4).to(tl.float32), input_precision="ieee"))
        b_l3 = tl.reshape(b_l, (BLOCK_M, BLOCK_C, L))
        b_top = tl.max(b_l3, axis=2)
        b_cl = b_top + tl.log(tl.sum(tl.exp(b_l3 - b_top[:, :, None]), axis=2))
    return b_cl


@triton.jit
def _block_diagonal(b_q, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, PHASES: tl.constexpr):
    """Query rows ``[BLOCK_M, BLOCK_H]`` laid block-diagonally, ``[BLOCK_M * PHASES, PHASES * BLOCK_H]`` fp16: row
    ``r * PHASES + p`` holds row ``r`` in column block ``p`` (``_chunk_logits_phases``); built once a program."""
    o_p = tl.arange(0, PHASES)
    diagonal = (o_p[:, None] == o_p[None, :])[None, :, :, None]
    rows = tl.where(diagonal, b_q[:, None, None, :], 0.0)
    return tl.reshape(rows, (BLOCK_M * PHASES, PHASES * BLOCK_H)).to(tl.float16)


@triton.jit
def _chunk_logits_phases(a_lo, a_hi, p_kc, m_kc, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, L: tl.constexpr,
                         PHASES: tl.constexpr, ASM: tl.constexpr):
    """The ``"fp16_asm_phases"`` form: ``fp16_asm`` with no padded query rows. A decode step has ``G * n`` = 4 query
    rows where a tensor-core dot needs 16, so ``PHASES`` consecutive tokens share a column: the codes ``[T, H]`` are
    read as ``[PHASES * H, T / PHASES]`` (``p_kc``: a chunk's tokens lie back to back, so that is a plain strided
    read) against the query rows laid block-diagonally (``a_lo``, ``a_hi``: ``_block_diagonal``), so logit
    ``(r * PHASES + p, t)`` is row ``r``'s for token ``t * PHASES + p`` and every exp of the log-sum-exp is a real one
    (a quarter of ``fp16_asm``'s at G = 4)."""
    lo, hi = _fp16_nibble_pair(tl.load(p_kc, mask=m_kc, other=0), ASM)
    b_l = tl.dot(a_lo, lo) + tl.dot(a_hi, hi)
    b_l4 = tl.reshape(b_l, (BLOCK_M, PHASES, BLOCK_C, L // PHASES))
    b_top = tl.max(tl.max(b_l4, axis=3), axis=1)
    b_sum = tl.sum(tl.sum(_exp2(b_l4 - b_top[:, None, :, None], ASM), axis=3), axis=1)
    return (b_top + tl.log2(b_sum)) * LN2


@triton.jit
def _chunk_logits_phases_rows(b_lo_t, b_hi_t, p_kc, m_kc, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                              L: tl.constexpr, PHASES: tl.constexpr, ASM: tl.constexpr):
    """``_chunk_logits_phases`` turned around (``"fp16_asm_phases_tokens"``): the codes ``[T / PHASES, PHASES * H]``
    (row i: tokens i*P..i*P+P-1 back to back, one contiguous read) the dots' rows, the block-diagonal query
    ``[PHASES * H, BLOCK_M * PHASES]`` their columns; logit ``(i, r * PHASES + p)`` is row ``r``'s for token
    ``i * PHASES + p``. The many-row operand is the codes, the shape Hopper's warpgroup dots take from registers."""
    lo, hi = _fp16_nibble_pair(tl.load(p_kc, mask=m_kc, other=0), ASM)
    b_l = tl.dot(lo, b_lo_t) + tl.dot(hi, b_hi_t)
    b_l4 = tl.reshape(b_l, (BLOCK_C, L // PHASES, BLOCK_M, PHASES))
    b_top = tl.max(tl.max(b_l4, axis=3), axis=1)
    b_sum = tl.sum(tl.sum(_exp2(b_l4 - b_top[:, None, :, None], ASM), axis=3), axis=1)
    return tl.trans((b_top + tl.log2(b_sum)) * LN2)


@triton.jit
def _chunk_logits_codes_as_rows(b_qlo, b_qhi, p_k, o_h, m_h, m_t, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                                L: tl.constexpr, FAST_DOT: tl.constexpr, DOT_FORM: tl.constexpr):
    """``_chunk_logits_codes_as_columns`` with the codes as stored (``[BLOCK_T, BLOCK_H]``) the dots' rows: many
    tokens against a few query rows, the shape tensor cores tile best; logits ``[BLOCK_T, BLOCK_M]``."""
    b_kt = tl.load(p_k[:, None] + o_h[None, :], mask=m_t[:, None] & m_h[None, :], other=0)
    if FAST_DOT and DOT_FORM == 2:
        b_lt = _int8x2_token_logits(b_qlo, b_qhi, b_kt)
    elif FAST_DOT:
        b_lt = (tl.dot((b_kt & 15).to(tl.float16), tl.trans(b_qlo.to(tl.float16)))
                + tl.dot((b_kt >> 4).to(tl.float16), tl.trans(b_qhi.to(tl.float16))))
    else:
        b_lt = (tl.dot((b_kt & 15).to(tl.float32), tl.trans(b_qlo), input_precision="ieee")
                + tl.dot((b_kt >> 4).to(tl.float32), tl.trans(b_qhi), input_precision="ieee"))
    b_l3 = tl.reshape(b_lt, (BLOCK_C, L, BLOCK_M))
    b_top = tl.max(b_l3, axis=1)
    return tl.trans(b_top + tl.log(tl.sum(tl.exp(b_l3 - b_top[:, None, :]), axis=1)))


@triton.jit
def code_logits_kernel(q, codes, code_scale, sel, logits, blk_max, blk_sum, scale, n, C, NB, Hkv,
                       s_qb, s_qh, s_qn, s_qd, s_cb, s_ch, s_cc, s_sb, s_sh, s_sd,
                       G: tl.constexpr, HALF: tl.constexpr, L: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, FAST_DOT: tl.constexpr,
                       DOT_FORM: tl.constexpr, TOKEN_ROWS: tl.constexpr, BLOCKS: tl.constexpr,
                       STAGES: tl.constexpr, ASM: tl.constexpr, PHASES: tl.constexpr):
    i_c = tl.program_id(0)
    i_m = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    i_b = i_bh // Hkv
    i_h = i_bh % Hkv
    GN = G * n
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)  # row m: token m % n of query head h*G + m // n
    m_m = o_m < GN
    o_h = tl.arange(0, BLOCK_H)
    m_h = o_h < HALF
    m_q = m_m[:, None] & m_h[None, :]
    p_q = (q + i_b * s_qb + (i_h * G + o_m[:, None] // n).to(tl.int64) * s_qh
           + (o_m[:, None] % n).to(tl.int64) * s_qn + o_h[None, :] * s_qd)
    p_s = code_scale + i_b * s_sb + i_h * s_sh + o_h * s_sd  # each channel's step (row 0 of [2, D])
    b_qlo = tl.load(p_q, mask=m_q, other=0.0).to(tl.float32) * (tl.load(p_s, mask=m_h, other=0.0) * scale)[None, :]
    b_qhi = tl.load(p_q + HALF * s_qd, mask=m_q, other=0.0).to(tl.float32) \
        * (tl.load(p_s + HALF * s_sd, mask=m_h, other=0.0) * scale)[None, :]
    if FAST_DOT and DOT_FORM >= 3:  # logits in base 2; the high nibbles are read as 16 * code
        b_qlo = b_qlo * LOG2E
        b_qhi = b_qhi * (LOG2E / 16)
    # token t of a block is token t % L of chunk t // L; the program's BLOCKS blocks in a software-pipelined loop
    # (the next block's codes load while this one's dots run), its block statistics kept online
    o_t = tl.arange(0, BLOCK_C * L)
    o_cb = tl.arange(0, BLOCK_C)
    p_kh = codes + i_b * s_cb + i_h * s_ch + (o_t % L) * HALF
    if FAST_DOT and DOT_FORM == 4 and PHASES > 1:
        # the phases form's view of a block: column i its tokens i*P..i*P+P-1, row p*BLOCK_H + h their channel pair h
        # (TOKEN_ROWS: the transpose, row i and column p*BLOCK_H + h)
        o_i = tl.arange(0, BLOCK_C * L // PHASES) * PHASES
        o_j = tl.arange(0, PHASES * BLOCK_H)
        a_lo = _block_diagonal(b_qlo, BLOCK_M, BLOCK_H, PHASES)
        a_hi = _block_diagonal(b_qhi, BLOCK_M, BLOCK_H, PHASES)
        if TOKEN_ROWS:
            p_kph = codes + i_b * s_cb + i_h * s_ch + ((o_i % L)[:, None] + (o_j // BLOCK_H)[None, :]) * HALF \
                + (o_j % BLOCK_H)[None, :]
            m_jh = ((o_j % BLOCK_H) < HALF)[None, :]
            a_lo = tl.trans(a_lo)
            a_hi = tl.trans(a_hi)
        else:
            p_kph = codes + i_b * s_cb + i_h * s_ch + ((o_i % L)[None, :] + (o_j // BLOCK_H)[:, None]) * HALF \
                + (o_j % BLOCK_H)[:, None]
            m_jh = ((o_j % BLOCK_H) < HALF)[:, None]
    else:
        a_lo = b_qlo
        a_hi = b_qhi
    run_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_M], tl.float32)
    for j in tl.range(0, BLOCKS, num_stages=STAGES):
        c0 = (i_c * BLOCKS + j) * BLOCK_C
        o_tc = c0 + o_t // L
        p_k = p_kh + o_tc.to(tl.int64) * s_cc
        if FAST_DOT and DOT_FORM == 4 and PHASES > 1 and TOKEN_ROWS:
            o_ic = c0 + o_i // L
            p_kc = p_kph + o_ic.to(tl.int64)[:, None] * s_cc
            b_cl = _chunk_logits_phases_rows(a_lo, a_hi, p_kc, m_jh & (o_ic < C)[:, None], BLOCK_M, BLOCK_C, L,
                                             PHASES, ASM)
        elif FAST_DOT and DOT_FORM == 4 and PHASES > 1:
            o_ic = c0 + o_i // L
            p_kc = p_kph + o_ic.to(tl.int64)[None, :] * s_cc
            b_cl = _chunk_logits_phases(a_lo, a_hi, p_kc, m_jh & (o_ic < C)[None, :], BLOCK_M, BLOCK_C, L, PHASES, ASM)
        elif TOKEN_ROWS:
            b_cl = _chunk_logits_codes_as_rows(b_qlo, b_qhi, p_k, o_h, m_h, o_tc < C, BLOCK_M, BLOCK_C, L, FAST_DOT,
                                               DOT_FORM)
        else:  # the default: the query rows are the dots' rows (a token-major tile was slower on the H100)
            b_cl = _chunk_logits_codes_as_columns(b_qlo, b_qhi, p_k, o_h, m_h, o_tc < C, BLOCK_M, BLOCK_C, L,
                                                  FAST_DOT, DOT_FORM, ASM)
        o_c = c0 + o_cb
        m_c = o_c < C
        b_sel = tl.load(sel + i_bh * C + o_c, mask=m_c, other=0) != 0
        b_cl = tl.where(b_sel[None, :], b_cl, float("-inf"))
        tl.store(logits + (i_bh * GN + o_m[:, None]) * C + o_c[None, :], b_cl, mask=m_m[:, None] & m_c[None, :])
        # block statistics as score_logits_kernel writes them: a max, and a sum of exp against it (0 if -inf)
        new_max = tl.maximum(run_max, tl.max(b_cl, axis=1))
        ref = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - ref) + tl.sum(tl.exp(b_cl - ref[:, None]), axis=1)
        run_max = new_max
    p_stat = (i_bh * GN + o_m) * NB + i_c
    tl.store(blk_max + p_stat, run_max, mask=m_m)
    tl.store(blk_sum + p_stat, run_sum, mask=m_m)


def supports(chunk_size: int, head_dim: int) -> bool:
    """Shapes the kernel tiles: a power-of-two chunk (a block's tokens are a power of two) and an even head dim."""
    return chunk_size & (chunk_size - 1) == 0 and chunk_size <= GPU_TILES["block_t"] and head_dim % 2 == 0


def score_code_chunks(q: torch.Tensor, codes: torch.Tensor, code_scale: torch.Tensor, selectable: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """Triton twin of ``naive.score_code_chunks``.

    Args:
        q: ``[B, Hq, n, D]`` post-RoPE queries (bf16, fp16 or fp32; any strides).
        codes: ``[B, Hkv, C, L*D/2]`` uint8 on ``q``'s device, last dim contiguous (other strides free).
        code_scale: ``[B, Hkv, 2, D]`` float32: each channel's step and low (any strides: rows may share one).
        selectable: ``[B, Hkv, C]`` bool.
        scale: softmax scale of ``q . key``.
    Returns:
        ``[B, Hkv, C]`` float32, ``-inf`` where not selectable.
    """
    b, hq, n, d = q.shape
    hkv, c, width = codes.shape[1:]
    chunk = 2 * width // d if d else 0
    if codes.dtype != torch.uint8 or codes.shape[0] != b or hq % hkv or chunk * d != 2 * width \
            or not supports(chunk, d) or codes.stride(-1) != 1:
        raise ValueError(f"codes must be uint8 [{b}, Hkv, C, L*{d}/2] (L a power of two, last dim contiguous) "
                         f"beside q {tuple(q.shape)}, got {codes.dtype} {tuple(codes.shape)}")
    if code_scale.shape != (b, hkv, 2, d) or code_scale.dtype != torch.float32:
        raise ValueError(f"code_scale must be float32 {(b, hkv, 2, d)}, got {code_scale.dtype} {tuple(code_scale.shape)}")
    if selectable.shape != (b, hkv, c) or selectable.dtype != torch.bool:
        raise ValueError(f"selectable must be bool {(b, hkv, c)}, got {selectable.dtype} {tuple(selectable.shape)}")
    if len({t.device for t in (q, codes, code_scale, selectable)}) != 1:
        raise ValueError("q, codes, code_scale and selectable must be on one device")
    out = triton_score._scratch(b, hkv, c, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    g, gpu = hq // hkv, q.device.type == "cuda"
    fast_dot = (gpu or GPU_DOTS_OFF_GPU) and q.dtype != torch.float32
    form, token_rows = DOT_FORMS[GPU_TILES["dot"]]
    gn = g * n
    block_m = max(16, min(64, triton.next_power_of_2(gn)))
    phases = 1
    if form == 4 and fast_dot:  # as many tokens a column as fill the dot's 16 rows and divide a chunk
        phases = 16 // min(16, triton.next_power_of_2(gn))
        while chunk % phases:
            phases //= 2
        block_m = 16 // phases
    block_c = max(1, (GPU_TILES["block_t"] if gpu else 64) // chunk)
    block_c = max(block_c, triton.cdiv(16 * phases, chunk))  # tl.dot wants >= 16 columns
    blocks = GPU_TILES["blocks"] if gpu else 2  # the interpreter runs the loop too
    nb = triton.cdiv(c, block_c * blocks)
    logits = triton_score._scratch(b, hkv, gn, c, dtype=torch.float32, device=q.device)
    blk_max = triton_score._scratch(b, hkv, gn, nb, dtype=torch.float32, device=q.device)
    blk_sum = triton_score._scratch(b, hkv, gn, nb, dtype=torch.float32, device=q.device)
    sel = selectable.contiguous().view(torch.uint8)
    code_logits_kernel[(nb, triton.cdiv(gn, block_m), b * hkv)](
        q, codes, code_scale, sel, logits, blk_max, blk_sum, float(scale), n, c, nb, hkv,
        *q.stride(), *codes.stride()[:3], code_scale.stride(0), code_scale.stride(1), code_scale.stride(3),
        G=g, HALF=d // 2, L=chunk, BLOCK_M=block_m, BLOCK_C=block_c,
        BLOCK_H=max(32 if form == 2 else 16, triton.next_power_of_2(d // 2)),  # int8 dots: k a multiple of 32
        FAST_DOT=fast_dot, DOT_FORM=form, TOKEN_ROWS=token_rows, BLOCKS=blocks,
        STAGES=GPU_TILES["stages"], ASM=gpu, PHASES=phases, num_warps=GPU_TILES["num_warps"],
    )
    return triton_score.launch_reduce(logits, blk_max, blk_sum, sel, out, n)
