"""Flash-decoding over one persistent per-layer K/V buffer: no ``torch.cat``, no per-head K/V copies.

The buffer ``[B, Hkv, N, D]`` is laid out as ``[outliers | selected chunks | local window | tail]``.
Keys before ``tail_start`` carry a validity flag (``key_valid``); the tail holds generated tokens
and query ``i`` of ``n`` sees tail slot ``t`` iff ``first[b] <= t <= fill - n + i`` (causal among the
new tokens; slots before ``first`` were folded into the compressed store),
with ``fill`` read on the device so the step can be captured as a CUDA graph.

The query count ``n`` is a run-time argument, not a compile-time one: a step of a new ``n`` (a
question asked of a stored document, draft tokens) would otherwise compile both kernels again in the
middle of serving (Triton still specialises ``n == 1``).
The ``G * n`` query rows of one KV head form one tile that shares every K/V tile read (``tl.dot``,
fp32 accumulation, online softmax in fp32). When ``B * Hkv`` programs cannot fill the GPU, keys are
split across several programs and a second small kernel merges their partial (max, sum, acc).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
BLOCK_N = 64  # keys per tile: two 16 KB bf16 tiles (K and V) at D = 128
NUM_WARPS = 4
NUM_STAGES = 3  # K/V tiles in flight per program; (64, 4, 3) is within 2% of the best of a 27-setting H100 sweep
H100_SMS = 132  # the target's SM count, used when no CUDA device can be asked (interpreter runs)


@triton.jit
def decode_split_kernel(
    q, k, v, valid, fill_ptr, first_ptr, out, part_m, part_l, part_acc,
    Hkv, N, tail_start, split_len, n_splits, NQ,
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_mb, s_mh, s_ob, s_oh, s_on,
    qk_scale,
    G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    SINGLE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, HAS_FIRST: tl.constexpr,
):
    i_bh = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1).to(tl.int64)
    i_b = i_bh // Hkv
    i_h = i_bh % Hkv
    # row r of the tile is query token r % n of query head h * G + r // n
    o_m = tl.arange(0, BLOCK_M)
    m_m = o_m < G * NQ
    o_q = (i_h * G + o_m // NQ).to(tl.int64)
    o_i = o_m % NQ
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    p_q = q + i_b * s_qb + o_q[:, None] * s_qh + o_i[:, None].to(tl.int64) * s_qn + o_d[None, :]
    b_q = tl.load(p_q, mask=m_m[:, None] & (o_d[None, :] < D), other=0.0)
    if UPCAST:  # the CPU interpreter computes bf16 wrongly: work in fp32 there
        b_q = b_q.to(tl.float32)
    fill = tl.load(fill_ptr).to(tl.int64)
    # last tail slot row r may see; past it nothing is read (the preallocated tail is mostly empty)
    b_last = fill - NQ + o_i
    # tail slots before ``first`` were folded into this row's compressed store
    first = 0
    if HAS_FIRST:
        first = tl.load(first_ptr + i_b).to(tl.int64)
    lo = i_s * split_len
    hi = tl.minimum(tl.minimum(lo + split_len, N), tail_start + fill)
    b_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    b_sum = tl.zeros([BLOCK_M], tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    p_k = k + i_b * s_kb + i_h * s_kh
    p_v = v + i_b * s_vb + i_h * s_vh
    p_valid = valid + i_b * s_mb + i_h * s_mh
    for start in range(lo, hi, BLOCK_N):
        o_n = start + tl.arange(0, BLOCK_N).to(tl.int64)
        m_pre = o_n < tail_start
        b_valid = tl.load(p_valid + o_n, mask=m_pre, other=0) != 0
        m_tail = (o_n >= tail_start + first) & (o_n < hi)
        m_rows = b_valid[None, :] | (m_tail[None, :] & (o_n[None, :] - tail_start <= b_last[:, None]))
        m_rows = m_rows & m_m[:, None]
        # keys no row may see are not read: saves bandwidth, and garbage (even NaN) never meets a 0 weight
        m_key = b_valid | m_tail
        b_k = tl.load(p_k + o_n[:, None] * s_kn + o_d[None, :], mask=m_key[:, None] & (o_d[None, :] < D), other=0.0)
        b_v = tl.load(p_v + o_n[:, None] * s_vn + o_dv[None, :], mask=m_key[:, None] & (o_dv[None, :] < DV), other=0.0)
        if UPCAST:
            b_k = b_k.to(tl.float32)
            b_v = b_v.to(tl.float32)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
        b_s = tl.where(m_rows, b_s, float("-inf"))
        b_new = tl.maximum(b_max, tl.max(b_s, 1))
        # a row with no valid key so far keeps max -inf: shift by 0 instead, so exp2 gives 0, not NaN
        b_ref = tl.where(b_new == float("-inf"), 0.0, b_new)
        b_alpha = tl.exp2(b_max - b_ref)
        b_p = tl.exp2(b_s - b_ref[:, None])
        b_sum = b_sum * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PRECISION)
        b_max = b_new
    m_out = m_m[:, None] & (o_dv[None, :] < DV)
    if SINGLE:
        # one split covers every key: normalise here and skip the combine kernel
        b_out = b_acc / tl.where(b_sum > 0, b_sum, 1.0)[:, None]
        p_out = out + i_b * s_ob + o_q[:, None] * s_oh + o_i[:, None].to(tl.int64) * s_on + o_dv[None, :]
        tl.store(p_out, b_out.to(out.dtype.element_ty), mask=m_out)
    else:
        i_part = i_bh * n_splits + i_s
        tl.store(part_m + i_part * (G * NQ) + o_m, b_max, mask=m_m)
        tl.store(part_l + i_part * (G * NQ) + o_m, b_sum, mask=m_m)
        tl.store(part_acc + (i_part * (G * NQ) + o_m[:, None]) * DV + o_dv[None, :], b_acc, mask=m_out)


@triton.jit
def decode_combine_kernel(
    part_m, part_l, part_acc, out, Hkv, n_splits, NQ, s_ob, s_oh, s_on,
    G: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    i_bh = tl.program_id(0).to(tl.int64)
    i_b = i_bh // Hkv
    i_h = i_bh % Hkv
    o_m = tl.arange(0, BLOCK_M)
    m_m = o_m < G * NQ
    o_dv = tl.arange(0, BLOCK_DV)
    m_out = m_m[:, None] & (o_dv[None, :] < DV)
    b_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    b_sum = tl.zeros([BLOCK_M], tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for i_s in range(0, n_splits):
        i_part = i_bh * n_splits + i_s
        # a fully masked split reports max -inf, sum 0, acc 0; it must weigh 0, not NaN
        b_m = tl.load(part_m + i_part * (G * NQ) + o_m, mask=m_m, other=float("-inf"))
        b_l = tl.load(part_l + i_part * (G * NQ) + o_m, mask=m_m, other=0.0)
        b_a = tl.load(part_acc + (i_part * (G * NQ) + o_m[:, None]) * DV + o_dv[None, :], mask=m_out, other=0.0)
        b_new = tl.maximum(b_max, b_m)
        b_ref = tl.where(b_new == float("-inf"), 0.0, b_new)
        b_old = tl.exp2(b_max - b_ref)
        b_w = tl.exp2(b_m - b_ref)
        b_sum = b_sum * b_old + b_l * b_w
        b_acc = b_acc * b_old[:, None] + b_a * b_w[:, None]
        b_max = b_new
    b_out = b_acc / tl.where(b_sum > 0, b_sum, 1.0)[:, None]
    o_q = (i_h * G + o_m // NQ).to(tl.int64)
    o_i = (o_m % NQ).to(tl.int64)
    p_out = out + i_b * s_ob + o_q[:, None] * s_oh + o_i[:, None] * s_on + o_dv[None, :]
    tl.store(p_out, b_out.to(out.dtype.element_ty), mask=m_out)


def choose_splits(programs: int, keys: int, sms: int = H100_SMS) -> int:
    """Key splits per KV head: enough that ``programs * splits`` fills ~2 waves of ``sms``,
    never more than one ``BLOCK_N`` tile per split."""
    tiles = triton.cdiv(keys, BLOCK_N)
    wanted = min(tiles, max(1, triton.cdiv(2 * sms, programs)))
    # equal tile counts per split; the rounding may leave fewer splits than wanted
    return triton.cdiv(tiles, triton.cdiv(tiles, wanted))


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count  # cached: a host call per step adds up


def launch_decode_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, key_valid: torch.Tensor,
                            tail_start: int, tail_fill: torch.Tensor, scale: float, out: torch.Tensor,
                            num_splits: int | None, tail_first: torch.Tensor | None) -> torch.Tensor:
    """Splits, partial buffers, grids and launches of both kernels into ``out`` (arguments checked
    by ``decode_attention``)."""
    b, hq, n, d = q.shape
    hkv, keys, dv = k_buf.shape[1], k_buf.shape[2], v_buf.shape[3]
    group = hq // hkv
    if key_valid.dtype == torch.bool:
        key_valid = key_valid.view(torch.uint8)  # same bytes; Triton pointers to bool are i1
    on_gpu = q.device.type == "cuda"
    if num_splits is None:
        sms = _sm_count(q.device) if on_gpu else H100_SMS
        num_splits = choose_splits(b * hkv, keys, sms)
    split_len = triton.cdiv(triton.cdiv(keys, num_splits), BLOCK_N) * BLOCK_N
    num_splits = triton.cdiv(keys, split_len)
    single = num_splits == 1
    rows = group * n
    part_m = part_l = part_acc = out  # unused placeholders when one split writes ``out`` directly
    if not single:
        part_m = torch.empty(b * hkv * num_splits * rows, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(b * hkv * num_splits * rows * dv, dtype=torch.float32, device=q.device)
    block_m = max(16, triton.next_power_of_2(rows))  # tl.dot needs >= 16 rows
    block_d, block_dv = max(16, triton.next_power_of_2(d)), max(16, triton.next_power_of_2(dv))
    # fp32 products where the inputs are fp32 (tf32 would cost ~1e-3 relative); bf16/fp16 ignore it
    precision = "ieee" if q.dtype == torch.float32 or not on_gpu else "tf32"
    decode_split_kernel[(b * hkv, num_splits)](
        q, k_buf, v_buf, key_valid, tail_fill, tail_fill if tail_first is None else tail_first.contiguous(), out,
        part_m, part_l, part_acc,
        hkv, keys, tail_start, split_len, num_splits, n,
        q.stride(0), q.stride(1), q.stride(2), k_buf.stride(0), k_buf.stride(1), k_buf.stride(2),
        v_buf.stride(0), v_buf.stride(1), v_buf.stride(2), key_valid.stride(0), key_valid.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        scale * LOG2E,  # exp2 below: fold log2(e) into the scale once
        G=group, D=d, DV=dv, BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_D=block_d, BLOCK_DV=block_dv,
        SINGLE=single, UPCAST=not on_gpu, PRECISION=precision, HAS_FIRST=tail_first is not None,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    if not single:
        decode_combine_kernel[(b * hkv,)](
            part_m, part_l, part_acc, out, hkv, num_splits, n, out.stride(0), out.stride(1), out.stride(2),
            G=group, DV=dv, BLOCK_M=block_m, BLOCK_DV=block_dv, num_warps=4,
        )
    return out


def _check(q, k_buf, v_buf, key_valid, tail_start, tail_fill, out, tail_first=None):
    b, hq, n, d = q.shape
    bk, hkv, keys, dk = k_buf.shape
    if (bk, hkv, keys) != tuple(v_buf.shape[:3]) or dk != d or b != bk:
        raise ValueError(f"q {tuple(q.shape)}, k_buf {tuple(k_buf.shape)}, v_buf {tuple(v_buf.shape)} do not match")
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    if not 0 <= tail_start < keys:
        raise ValueError(f"tail_start={tail_start} must lie in [0, {keys})")
    if key_valid.dtype not in (torch.bool, torch.uint8) or key_valid.shape[:2] != (b, hkv) \
            or key_valid.shape[2] < tail_start:
        raise ValueError(f"key_valid must be bool/uint8 [{b}, {hkv}, >={tail_start}], "
                         f"got {key_valid.dtype} {tuple(key_valid.shape)}")
    if tail_fill.dtype != torch.int64 or tail_fill.numel() != 1:
        raise ValueError("tail_fill must be a one-element int64 tensor (the device-side fill level)")
    if tail_first is not None and (tail_first.dtype != torch.int64 or tuple(tail_first.shape) != (b,)):
        raise ValueError(f"tail_first must be an int64 [{b}] tensor (first visible tail slot per row)")
    tensors = [q, k_buf, v_buf, key_valid, tail_fill] + [t for t in (out, tail_first) if t is not None]
    if any(t.device != q.device for t in tensors):
        raise ValueError("all tensors must be on q's device")
    # the innermost dim is addressed without a stride: it must be contiguous
    if any(t.stride(-1) != 1 for t in (q, k_buf, v_buf, key_valid) + ((out,) if out is not None else ())):
        raise ValueError("q, k_buf, v_buf, key_valid and out need a contiguous last dimension")
    if out is not None and (tuple(out.shape) != (b, hq, n, v_buf.shape[3]) or out.dtype != q.dtype):
        raise ValueError(f"out must be {q.dtype} {(b, hq, n, v_buf.shape[3])}, got {out.dtype} {tuple(out.shape)}")


def decode_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, key_valid: torch.Tensor,
                     tail_start: int, tail_fill: torch.Tensor, scale: float, out: torch.Tensor | None = None,
                     *, num_splits: int | None = None, tail_first: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of new queries over a persistent ``[prefix | tail]`` K/V buffer (Triton).

    Parameters
    ----------
    q : ``[B, Hq, n, D]`` bf16/fp16/fp32; query head ``h`` reads KV head ``h // G``, ``G = Hq / Hkv``.
    k_buf, v_buf : ``[B, Hkv, N, D]`` and ``[B, Hkv, N, Dv]``, same dtype as ``q``.
    key_valid : ``[B, Hkv, >= tail_start]`` bool/uint8; only keys before ``tail_start`` are read.
    tail_start : first tail slot (host int, fixed by the layout).
    tail_fill : 0-dim int64 device tensor: tail tokens written, the ``n`` new ones included.
        Query ``i`` sees tail slot ``t`` iff ``t <= fill - n + i``. Read on the device, never synced.
    scale : softmax scale.
    out : optional ``[B, Hq, n, Dv]`` of ``q.dtype`` to write into (CUDA-graph friendly).
    num_splits : key splits per KV head; default from ``choose_splits`` (tests force it).
    tail_first : optional ``[B]`` int64 device tensor: row ``b`` sees no tail slot before
        ``tail_first[b]`` (tokens folded into its compressed store). Default: every slot.

    Returns
    -------
    ``[B, Hq, n, Dv]`` in ``q.dtype`` (``out`` when given).
    """
    _check(q, k_buf, v_buf, key_valid, tail_start, tail_fill, out, tail_first)
    b, hq, n, d = q.shape
    dv = v_buf.shape[3]
    if out is None:
        out = torch.empty(b, hq, n, dv, dtype=q.dtype, device=q.device)
    return launch_decode_attention(q, k_buf, v_buf, key_valid, tail_start, tail_fill, scale, out, num_splits,
                                   tail_first)
