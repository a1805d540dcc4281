"""A decode step's new tokens into the tail: key RoPE and three writes, in one kernel.

Per layer and step the unfused path runs the model's own key-RoPE function (five to seven tiny
kernels: two muls, a neg, a cat, an add, ...) and three ``index_copy_`` writes (post-RoPE key,
value, pre-RoPE key) with their slot arithmetic: a dozen launches that each move a few KB. At 32
layers that is ~400 launches per step, about a millisecond of a 12 ms step on an H100. Here one
program per ``(b, h, token)`` reads the token's pre-RoPE key and its cos/sin row, rotates it and
writes the three rows at the slot the device-side fill level names, so a replayed CUDA graph
writes where the current step belongs.

``ROUNDED`` rounds each product to bfloat16 before the sum, as eager bf16 ops do (``x*cos`` and
``rotate(x)*sin`` each round, then their sum does; the fp32 product of two bf16 values is exact),
so the result equals the model's function bit for bit. The rounding is integer arithmetic on the
bits (to nearest, ties to even, as torch's ``BFloat16`` cast): measured on an H100, a
``.to(bfloat16).to(float32)`` round trip did not keep the compiler from fusing the sum (1-ulp
differences). Whether the kernel reproduces a given model is not assumed: prefill checks it on the
real keys (``rotates_like_flag``) and keeps the model's function where it does not (fp16, fp32 models).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from shadowkv_fx.kernels.rope_forms import FORMS

_FORMS = {name: i + 1 for i, name in enumerate(FORMS)}  # rotate_half: 1, interleaved: 2


@triton.jit
def _round_to_bf16(x):
    """``x`` (fp32, finite) rounded to the nearest bfloat16, ties to even, still as fp32."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def append_rope_kernel(k_pre, v, cos, sin, k_out, v_out, pre_out, fill, k_base, pre_base, Hkv,
                       s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, s_cb, s_cn, s_cd, s_nb, s_nn, s_nd,
                       s_ob, s_oh, s_on, s_od, s_wb, s_wh, s_wn, s_wd, s_pb, s_ph, s_pn, s_pd,
                       D: tl.constexpr, DV: tl.constexpr, HALF: tl.constexpr, FORM: tl.constexpr,
                       ROUNDED: tl.constexpr, KEEP_PRE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    i_bh = tl.program_id(0).to(tl.int64)
    i_n = tl.program_id(1).to(tl.int64)
    i_b = i_bh // Hkv
    i_h = i_bh % Hkv
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    m_rot = o_d < 2 * HALF
    # each rotated dim's partner in its pair, the sign the partner enters with, and its table column
    if FORM == 2:
        o_partner = o_d ^ 1
        b_sign = tl.where(o_d % 2 == 0, -1.0, 1.0)
        o_col = o_d // 2
    else:
        o_partner = tl.where(o_d < HALF, o_d + HALF, o_d - HALF)
        b_sign = tl.where(o_d < HALF, -1.0, 1.0)
        o_col = o_d
    p_k = k_pre + i_b * s_kb + i_h * s_kh + i_n * s_kn
    b_x = tl.load(p_k + o_d * s_kd, mask=m_d, other=0.0)
    b_xf = b_x.to(tl.float32)
    b_xp = tl.load(p_k + o_partner * s_kd, mask=m_rot, other=0.0).to(tl.float32)
    b_cos = tl.load(cos + i_b * s_cb + i_n * s_cn + o_col * s_cd, mask=m_rot, other=0.0).to(tl.float32)
    b_sin = tl.load(sin + i_b * s_nb + i_n * s_nn + o_col * s_nd, mask=m_rot, other=0.0).to(tl.float32)
    b_a = b_xf * b_cos
    b_r = (b_sign * b_xp) * b_sin
    if ROUNDED:
        b_a = _round_to_bf16(b_a)
        b_r = _round_to_bf16(b_r)
    b_sum = b_a + b_r
    if ROUNDED:  # then the cast below is exact, whatever rounding mode it would use
        b_sum = _round_to_bf16(b_sum)
    b_rot = tl.where(m_rot, b_sum, b_xf)  # dims past the rotary width pass through

    slot = tl.load(fill).to(tl.int64) + i_n
    tl.store(k_out + i_b * s_ob + i_h * s_oh + (k_base + slot) * s_on + o_d * s_od,
             b_rot.to(k_out.dtype.element_ty), mask=m_d)
    if KEEP_PRE:
        tl.store(pre_out + i_b * s_pb + i_h * s_ph + (pre_base + slot) * s_pn + o_d * s_pd,
                 b_x.to(pre_out.dtype.element_ty), mask=m_d)
    o_v = tl.arange(0, BLOCK_DV)
    m_v = o_v < DV
    b_v = tl.load(v + i_b * s_vb + i_h * s_vh + i_n * s_vn + o_v * s_vd, mask=m_v, other=0.0)
    tl.store(v_out + i_b * s_wb + i_h * s_wh + (k_base + slot) * s_wn + o_v * s_wd,
             b_v.to(v_out.dtype.element_ty), mask=m_v)


def _table_strides(t: torch.Tensor) -> tuple[int, int, int]:
    # a batch-1 table serves every sequence through a zero batch stride
    return (t.stride(0) if t.shape[0] > 1 else 0, t.stride(2), t.stride(3))


def launch_append_rope(k_pre: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_form: str,
                       k_out: torch.Tensor, v_out: torch.Tensor, fill: torch.Tensor, k_base: int,
                       pre_out: torch.Tensor | None, pre_base: int, rounded: bool) -> None:
    """Grid and launch of ``append_rope_kernel``: one program per ``(b, h, token)`` (arguments
    checked by ``append_rope``)."""
    b, hkv, n, d = k_pre.shape
    dv = v.shape[-1]
    keep_pre = pre_out is not None
    pre = pre_out if keep_pre else k_out
    append_rope_kernel[(b * hkv, n)](
        k_pre, v, cos, sin, k_out, v_out, pre, fill, k_base, pre_base, hkv,
        *k_pre.stride(), *v.stride(), *_table_strides(cos), *_table_strides(sin),
        *k_out.stride(), *v_out.stride(), *pre.stride(),
        D=d, DV=dv, HALF=cos.shape[-1] // 2, FORM=_FORMS[rope_form], ROUNDED=rounded, KEEP_PRE=keep_pre,
        BLOCK_D=triton.next_power_of_2(d), BLOCK_DV=triton.next_power_of_2(dv), num_warps=1,
    )


def append_rope(k_pre: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_form: str,
                k_out: torch.Tensor, v_out: torch.Tensor, fill: torch.Tensor, k_base: int,
                pre_out: torch.Tensor | None = None, pre_base: int = 0, rounded: bool | None = None) -> None:
    """Rotate ``k_pre`` and write it, ``v`` and (with ``pre_out``) ``k_pre`` at slots ``base + fill + i``.

    Parameters
    ----------
    k_pre : torch.Tensor
        ``[B, Hkv, n, D]`` new tokens' keys before RoPE.
    v : torch.Tensor
        ``[B, Hkv, n, Dv]`` their values.
    cos, sin : torch.Tensor
        ``[B or 1, 1, n, R]`` their RoPE tables (``R <= D`` even; dims past ``R`` pass through;
        ``interleaved`` reads column ``j // 2`` for dim ``j``, GLM's ``cat(freqs, freqs)`` layout).
    rope_form : str
        One of ``rope_forms.FORMS``.
    k_out, v_out, pre_out : torch.Tensor
        ``[B, Hkv, S, D|Dv]`` buffers (any strides); token ``i`` goes to slot ``k_base + fill + i``
        of ``k_out``/``v_out`` and ``pre_base + fill + i`` of ``pre_out``.
    fill : torch.Tensor
        0-d integer tensor on the device, read by the kernel (not by the host).
    rounded : bool, optional
        Round each product to bfloat16 before the sum, as eager bf16 ops do; by default where
        ``k_out`` is bf16.
    """
    b, hkv, n, d = k_pre.shape
    if rope_form not in _FORMS:
        raise ValueError(f"rope_form must be one of {FORMS}, got {rope_form!r}")
    if v.shape[:3] != (b, hkv, n) or cos.shape != sin.shape or cos.shape[0] not in (1, b) or cos.shape[2] != n:
        raise ValueError(f"k_pre {tuple(k_pre.shape)}, v {tuple(v.shape)}, cos {tuple(cos.shape)}, "
                         f"sin {tuple(sin.shape)} do not match")
    width = cos.shape[-1]
    if width % 2 or width > d:
        raise ValueError(f"rotary width {width} must be even and at most head dim {d}")
    if k_out.shape[:2] != (b, hkv) or v_out.shape[:2] != (b, hkv) or fill.numel() != 1:
        raise ValueError("k_out/v_out must be [B, Hkv, S, D] buffers and fill one integer")
    if n == 0:
        return
    if rounded is None:
        rounded = k_out.dtype == torch.bfloat16
    launch_append_rope(k_pre, v, cos, sin, rope_form, k_out, v_out, fill, k_base, pre_out, pre_base, rounded)


def rotates_like_flag(k_pre: torch.Tensor, k_rot: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      rope_form: str) -> torch.Tensor:
    """Whether ``append_rope`` gives the model's post-RoPE keys ``k_rot`` bit for bit on ``k_pre``
    (``[B, Hkv, n, D]``, tables ``[B|1, 1, n, R]``, on the device), as a device bool scalar: no host sync."""
    b, hkv, n, d = k_pre.shape
    out = torch.empty_like(k_rot)
    spare = torch.empty(b, hkv, n, 1, dtype=k_pre.dtype, device=k_pre.device)
    level = torch.zeros((), dtype=torch.long, device=k_pre.device)
    append_rope(k_pre, spare, cos, sin, rope_form, out, spare, level, 0)
    return (out == k_rot).all()
