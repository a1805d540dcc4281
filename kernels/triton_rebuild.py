"""Rebuild the chosen chunks' keys from the low-rank factors and apply RoPE, in one kernel.

The decode path (``LayerState.sparse_keys_values``) gathers ``U`` rows into a new tensor, runs an
fp32 matmul, rounds to bf16, gathers cos/sin rows into two more tensors and lets the model's RoPE
read all of them again. Here one program takes ``BLOCK_T`` output tokens of one ``(b, h)``: it
gathers their ``U`` rows, multiplies them by ``SV[b, h]`` on tensor cores (fp32 accumulation),
reads the cos/sin rows of their positions and writes the rotated keys once, in ``out``'s dtype.

The rotated head dims are computed as two dots whose columns are the two members of each RoPE
pair (``j`` and ``j + R/2`` for rotate-half, ``2j`` and ``2j + 1`` for interleaved), so the
rotation is elementwise between two accumulators with no register shuffle. Dims past the
rotary width ``R`` (partial RoPE) are a third dot, stored as they are.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from shadowkv_fx.kernels.rope_forms import rotary_width

_FORMS = {"none": 0, "rotate_half": 1, "interleaved": 2}
# allocator of the default ``out``: tests swap in a NaN-filling one so unwritten elements show
_scratch = torch.empty
# GPU tiles: output tokens and rank slice per step of one program, and its warps
GPU_TILES = {"block_t": 64, "block_r": 64, "num_warps": 4}  # best of a sweep on H100


@triton.jit
def rebuild_rope_kernel(u, sv, idx, pad, cos, sin, out, N, K, T, S, R, Hkv,
                        s_ub, s_ut, s_ur, s_sb, s_sh, s_sr, s_sd, s_cb, s_cs, s_cd, s_nb, s_ns, s_nd,
                        s_ob, s_oh, s_on, s_od,
                        L: tl.constexpr, HALF: tl.constexpr, PASS: tl.constexpr, FORM: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
                        UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    i_t = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // Hkv
    i_h = i_bh % Hkv
    # output row i is token i % L of the (i // L)-th chosen chunk
    o_n = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    m_n = o_n < N
    b_chunk = tl.load(idx + i_bh * K + o_n // L, mask=m_n, other=0).to(tl.int64)
    b_tok = b_chunk * L + o_n % L
    m_tok = m_n & (b_tok < T)  # never read past U, whatever the indices say
    # the two members of each rotary pair, and the table column each one's angle sits in
    o_j = tl.arange(0, BLOCK_H)
    m_j = o_j < HALF
    if FORM == 2:
        o_a = 2 * o_j
        o_b = 2 * o_j + 1
        o_tb = o_j  # GLM tables are cat(freqs, freqs): pair j reads column j for both members
    else:
        o_a = o_j
        o_b = o_j + HALF
        o_tb = o_j + HALF
    o_p = 2 * HALF + tl.arange(0, BLOCK_P)
    m_p = o_p < 2 * HALF + PASS

    p_u = u + i_b * s_ub + b_tok[:, None] * s_ut
    p_sv = sv + i_b * s_sb + i_h * s_sh
    b_a = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
    b_b = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
    b_p = tl.zeros([BLOCK_T, BLOCK_P], tl.float32)
    for start in range(0, R, BLOCK_R):
        o_r = start + tl.arange(0, BLOCK_R)
        m_r = o_r < R
        b_u = tl.load(p_u + o_r[None, :] * s_ur, mask=m_tok[:, None] & m_r[None, :], other=0.0)
        m_sv = m_r[:, None] & m_j[None, :]
        b_sa = tl.load(p_sv + o_r[:, None] * s_sr + o_a[None, :] * s_sd, mask=m_sv, other=0.0)
        b_sb = tl.load(p_sv + o_r[:, None] * s_sr + o_b[None, :] * s_sd, mask=m_sv, other=0.0)
        if UPCAST:  # the CPU interpreter computes bf16 dots wrongly; a GPU keeps the native dtype
            b_u = b_u.to(tl.float32)
            b_sa = b_sa.to(tl.float32)
            b_sb = b_sb.to(tl.float32)
        b_a = tl.dot(b_u, b_sa, b_a, input_precision=PRECISION)
        b_b = tl.dot(b_u, b_sb, b_b, input_precision=PRECISION)
        if PASS > 0:
            b_sp = tl.load(p_sv + o_r[:, None] * s_sr + o_p[None, :] * s_sd, mask=m_r[:, None] & m_p[None, :],
                           other=0.0)
            if UPCAST:
                b_sp = b_sp.to(tl.float32)
            b_p = tl.dot(b_u, b_sp, b_p, input_precision=PRECISION)

    if FORM != 0:
        # position in the padded prompt; picks of padding chunks run past the table and are masked later
        b_pos = tl.minimum(b_tok + tl.load(pad + i_b).to(tl.int64), S - 1)
        m_cs = m_n[:, None] & m_j[None, :]
        p_cos = cos + i_b * s_cb + b_pos[:, None] * s_cs
        p_sin = sin + i_b * s_nb + b_pos[:, None] * s_ns
        b_ca = tl.load(p_cos + o_j[None, :] * s_cd, mask=m_cs, other=0.0).to(tl.float32)
        b_cb = tl.load(p_cos + o_tb[None, :] * s_cd, mask=m_cs, other=0.0).to(tl.float32)
        b_na = tl.load(p_sin + o_j[None, :] * s_nd, mask=m_cs, other=0.0).to(tl.float32)
        b_nb = tl.load(p_sin + o_tb[None, :] * s_nd, mask=m_cs, other=0.0).to(tl.float32)
        # x*cos + rotate(x)*sin with rotate(x) = -x_b at a's slot and x_a at b's slot
        b_a, b_b = b_a * b_ca - b_b * b_na, b_b * b_cb + b_a * b_nb

    p_out = out + i_b * s_ob + i_h * s_oh + o_n[:, None].to(tl.int64) * s_on
    m_out = m_n[:, None] & m_j[None, :]
    tl.store(p_out + o_a[None, :] * s_od, b_a.to(out.dtype.element_ty), mask=m_out)
    tl.store(p_out + o_b[None, :] * s_od, b_b.to(out.dtype.element_ty), mask=m_out)
    if PASS > 0:
        tl.store(p_out + o_p[None, :] * s_od, b_p.to(out.dtype.element_ty), mask=m_n[:, None] & m_p[None, :])


def launch_rebuild_rope_keys(u: torch.Tensor, sv: torch.Tensor, chunk_idx: torch.Tensor, chunk_size: int,
                             pad: torch.Tensor | Sequence[int], cos: torch.Tensor, sin: torch.Tensor, rope_form: str,
                             width: int, out: torch.Tensor) -> torch.Tensor:
    """Tiles, grid and launch of ``rebuild_rope_kernel`` into ``out`` (arguments checked by ``rebuild_rope_keys``)."""
    b, t, r = u.shape
    hkv, d = sv.shape[1], sv.shape[3]
    k = chunk_idx.shape[-1]
    n = k * chunk_size
    pad = torch.as_tensor(pad, dtype=torch.int64, device=sv.device).contiguous()
    idx = chunk_idx.to(device=sv.device, dtype=torch.int64).contiguous()
    if rope_form == "none":  # no table is read: pass any valid pointer with zero strides
        cos = sin = out
        s_c = s_n = (0, 0, 0)
        s_len = 1
    else:
        # a batch-1 table serves every sequence through a zero batch stride
        s_c = (cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(2), cos.stride(3))
        s_n = (sin.stride(0) if sin.shape[0] > 1 else 0, sin.stride(2), sin.stride(3))
        s_len = cos.shape[2]
    gpu = sv.device.type == "cuda"
    half, rest = width // 2, d - width
    block_t = GPU_TILES["block_t"] if gpu else 32
    block_r = GPU_TILES["block_r"] if gpu else 32
    rebuild_rope_kernel[(triton.cdiv(n, block_t), b * hkv)](
        u, sv, idx, pad, cos, sin, out, n, k, t, s_len, r, hkv,
        *u.stride(), *sv.stride(), *s_c, *s_n, *out.stride(),
        L=chunk_size, HALF=half, PASS=rest, FORM=_FORMS[rope_form],
        # tl.dot wants every tile side >= 16: small ranks and head dims get masked lanes
        BLOCK_T=block_t, BLOCK_R=16 if r <= 16 else block_r, BLOCK_H=max(16, triton.next_power_of_2(half)),
        BLOCK_P=max(16, triton.next_power_of_2(rest)) if rest else 16,
        UPCAST=not gpu, PRECISION="ieee" if sv.dtype == torch.float32 else "tf32",
        num_warps=GPU_TILES["num_warps"] if gpu else 4,
    )
    return out


def rebuild_rope_keys(u: torch.Tensor, sv: torch.Tensor, chunk_idx: torch.Tensor, chunk_size: int,
                      pad: torch.Tensor | Sequence[int], cos: torch.Tensor, sin: torch.Tensor, rope_form: str,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Keys of the chosen chunks: ``U[tokens] @ SV`` then RoPE at ``token + pad``.

    Parameters
    ----------
    u : torch.Tensor
        ``[B, T, r]`` low-rank token factors; token ``t`` of chunk ``c`` is row ``c * L + t``.
    sv : torch.Tensor
        ``[B, Hkv, r, D]``, same dtype as ``u`` (bf16/fp16 on tensor cores, fp32 exact).
    chunk_idx : torch.Tensor
        ``[B, Hkv, k]`` integer chunk ids.
    chunk_size : int
        ``L`` tokens per chunk.
    pad : torch.Tensor or sequence of int
        ``[B]`` left-pad length of each sequence (its tokens sit at ``pad[b] + t``).
    cos, sin : torch.Tensor
        ``[B or 1, 1, S, R]`` per-position tables in the model's layout (``R = D`` for full RoPE;
        less for partial RoPE, the dims past ``R`` pass through). Positions past ``S - 1`` read row
        ``S - 1``. Ignored for ``rope_form="none"``.
    rope_form : str
        ``"rotate_half"`` (Llama: ``x*cos + cat(-x[R/2:R], x[:R/2])*sin``), ``"interleaved"`` (GLM:
        pairs ``(x[2i], x[2i+1])`` rotated by column ``i`` of tables laid out as
        ``cat(freqs, freqs)``) or ``"none"`` (pre-RoPE keys).
    out : torch.Tensor, optional
        ``[B, Hkv, k*L, D]`` destination of any float dtype and strides (e.g. a slice of a larger
        key buffer); a new tensor of ``sv.dtype`` when omitted.

    Returns
    -------
    torch.Tensor
        ``out``, holding ``[B, Hkv, k*L, D]`` keys.
    """
    b, t, r = u.shape
    hkv, d = sv.shape[1], sv.shape[3]
    k = chunk_idx.shape[-1]
    n = k * chunk_size
    if sv.shape != (b, hkv, r, d) or chunk_idx.shape != (b, hkv, k):
        raise ValueError(f"u {tuple(u.shape)}, sv {tuple(sv.shape)}, chunk_idx {tuple(chunk_idx.shape)} do not match")
    if u.dtype != sv.dtype:
        raise ValueError(f"u ({u.dtype}) and sv ({sv.dtype}) must share one dtype")
    if u.device != sv.device or (rope_form != "none" and (cos.device != sv.device or sin.device != sv.device)):
        raise ValueError("u, sv and the cos/sin tables must be on one device")
    width = rotary_width(cos, d, rope_form)
    if rope_form != "none" and (cos.shape != sin.shape or cos.shape[0] not in (1, b) or cos.shape[1] != 1):
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must be [B or 1, 1, S, R]")
    if out is None:
        out = _scratch(b, hkv, n, d, dtype=sv.dtype, device=sv.device)
    elif out.shape != (b, hkv, n, d) or out.device != sv.device:
        raise ValueError(f"out must be {(b, hkv, n, d)} on {sv.device}, got {tuple(out.shape)} on {out.device}")
    if out.numel() == 0:
        return out
    return launch_rebuild_rope_keys(u, sv, chunk_idx, chunk_size, pad, cos, sin, rope_form, width, out)
