"""Plain-PyTorch twins of the Triton kernels: the ground truth the kernels are tested against, and
the path ``dispatch.py`` takes where Triton does not run (CPU models, tests, ``SHADOWKV_NO_TRITON=1``).

Each kernel family's public function has a twin here under the same name, with the same
arguments and result (``score_chunks``, ``score_code_chunks``, ``top_chunks``, ``rebuild_rope_keys``,
``gather_value_chunks``, ``decode_attention``); the pieces they are built from sit beside them.
``triton_append.append_rope`` is held to the model's own RoPE function instead (its tests call it).

Shapes: ``B`` batch, ``Hq``/``Hkv`` query/key-value heads, ``G = Hq // Hkv``, ``n`` new
query tokens, ``C`` chunks, ``L`` chunk size, ``T`` compressed tokens, ``r`` rank, ``D`` head dim.
"""
from __future__ import annotations

from typing import Sequence

import torch

from shadowkv_fx.kernels.quantize import dequantize
from shadowkv_fx.kernels.rope_forms import rotary_width


def score_chunks(q: torch.Tensor, landmarks: torch.Tensor, selectable: torch.Tensor, scale: float,
                 landmark_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Twin of ``triton_score.score_chunks``. Chunk relevance: softmax(q . landmarks) per query head,
    summed over tokens, max over the GQA group.

    Args:
        q: ``[B, Hq, n, D]`` post-RoPE queries.
        landmarks: ``[B, Hkv, C, D]`` (int8 codes with ``landmark_scale``).
        selectable: ``[B, Hkv, C]`` bool; outlier and padding chunks are False.
        landmark_scale: optional ``[B, Hkv, C]`` float32: a chunk's logits are ``q . code`` times its
            scale (and ``scale``), so the dot reads the 8-bit codes as they are.
    Returns:
        ``[B, Hkv, C]`` float32, ``-inf`` where not selectable.
    """
    b, hq, n, d = q.shape
    hkv = landmarks.shape[1]
    grouped = q.float().view(b, hkv, hq // hkv, n, d)
    logits = torch.einsum("bhgnd,bhcd->bhgnc", grouped, landmarks.float())
    logits = logits * (scale if landmark_scale is None else landmark_scale.float()[:, :, None, None, :] * scale)
    logits = logits.masked_fill(~selectable[:, :, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    scores = probs.sum(dim=3).amax(dim=2)
    return scores.masked_fill(~selectable, float("-inf"))


def score_code_chunks(q: torch.Tensor, codes: torch.Tensor, code_scale: torch.Tensor, selectable: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """Twin of ``triton_code_score.score_code_chunks``. Chunk relevance from 4-bit per-key codes
    (``key_codes.py``): the attention mass of the keys they stand for, softmax over every selectable
    chunk's tokens per query head, summed per chunk and over the ``n`` tokens, max over the GQA group.
    (The Triton kernel reduces a chunk's tokens to their log-sum-exp and the chunks as landmarks are:
    the same mass.)

    Args:
        q: ``[B, Hq, n, D]`` post-RoPE queries.
        codes: ``[B, Hkv, C, L*D/2]`` uint8, packed codes of each chunk's keys.
        code_scale: ``[B, Hkv, 2, D]`` float32, each channel's step and low.
        selectable: ``[B, Hkv, C]`` bool.
    Returns:
        ``[B, Hkv, C]`` float32, ``-inf`` where not selectable.
    """
    b, hq, n, d = q.shape
    hkv, c, width = codes.shape[1:]
    chunk, half = 2 * width // d, d // 2
    tokens = codes.reshape(b, hkv, c * chunk, half)
    grouped = q.float().view(b, hkv, hq // hkv, n, d) * scale
    # q . (code * step + low) as (q * step) . code + q . low: the float keys are never formed
    # (decoding them each step made this 20x the landmarks' cost on a CPU)
    stepped = (grouped * code_scale[:, :, None, None, 0]).flatten(2, 3)  # [B, Hkv, G*n, D]
    logits = (torch.matmul(stepped[..., :half], (tokens & 15).float().transpose(-1, -2))
              + torch.matmul(stepped[..., half:], (tokens >> 4).float().transpose(-1, -2))
              + (grouped * code_scale[:, :, None, None, 1]).sum(-1).flatten(2, 3)[..., None])
    logits = logits.unflatten(-1, (c, chunk)).masked_fill(~selectable[:, :, None, :, None], float("-inf"))
    # the softmax over every token, summed per chunk: what score_chunks' softmax gives the chunks' log-sum-exps
    mass = torch.softmax(logits.flatten(-2), dim=-1).nan_to_num(0.0).unflatten(-1, (c, chunk)).sum(-1)
    scores = mass.view(b, hkv, hq // hkv, n, c).sum(3).amax(2)
    return scores.masked_fill(~selectable, float("-inf"))


def top_chunks(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of ``triton_topk.top_chunks``: the k best chunks per row and whether each pick is real.

    Args:
        scores: ``[B, Hkv, C]``; ``-inf`` marks chunks not to pick while k finite ones remain.
    Returns:
        ``indices [B, Hkv, k]`` int64 and ``picked [B, Hkv, k]`` bool (False where the score is not
        finite). With ``C < k`` the row is padded: those slots hold index 0, not picked.
    """
    c = scores.shape[-1]
    if c < k:
        scores = torch.nn.functional.pad(scores, (0, k - c), value=float("-inf"))
    top = torch.topk(scores, k, dim=-1)
    real = top.indices < c
    return top.indices.masked_fill(~real, 0), torch.isfinite(top.values) & real


def rebuild_keys(u: torch.Tensor, sv: torch.Tensor, token_idx: torch.Tensor) -> torch.Tensor:
    """Pre-RoPE keys of chosen tokens from the low-rank factors: ``U[token_idx] @ SV``.

    Args:
        u: ``[B, T, r]``; sv: ``[B, Hkv, r, D]``; token_idx: ``[B, Hkv, N]`` int64.
    Returns:
        ``[B, Hkv, N, D]`` in ``sv.dtype``.
    """
    b, hkv, n = token_idx.shape
    rows = torch.gather(u.unsqueeze(1).expand(b, hkv, -1, -1), 2, token_idx.unsqueeze(-1).expand(-1, -1, -1, u.shape[-1]))
    return torch.matmul(rows.float(), sv.float()).to(sv.dtype)


def gather_positions(table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rows of a per-position table (cos/sin and the like) for per-head token positions.

    Args:
        table: ``[B, 1, S, c]``; positions: ``[B, Hkv, N]`` int64 (padded-prompt indices).
    Returns:
        ``[B, Hkv, N, c]``.
    """
    b, hkv, n = positions.shape
    rows = table[:, 0].unsqueeze(1).expand(b, hkv, -1, -1)
    return torch.gather(rows, 2, positions.unsqueeze(-1).expand(-1, -1, -1, table.shape[-1]))


def rebuild_rope_keys(u: torch.Tensor, sv: torch.Tensor, chunk_idx: torch.Tensor, chunk_size: int,
                      pad: torch.Tensor | Sequence[int], cos: torch.Tensor, sin: torch.Tensor, rope_form: str,
                      dtype: torch.dtype | None = None) -> torch.Tensor:
    """Twin of ``triton_rebuild.rebuild_rope_keys`` (same arguments, ``dtype`` in place of ``out``),
    computed in float32 and cast to ``dtype``.

    Built from ``rebuild_keys`` and ``gather_positions``, as the CPU decode path does, with the
    rotation written out. Returns ``[B, Hkv, k*L, D]`` in ``dtype`` (default ``sv.dtype``).
    """
    d = sv.shape[-1]
    width = rotary_width(cos, d, rope_form)
    offsets = torch.arange(chunk_size, device=chunk_idx.device)
    token_idx = (chunk_idx.long()[..., None] * chunk_size + offsets).flatten(-2)
    keys = rebuild_keys(u.float(), sv.float(), token_idx)
    if rope_form != "none":
        pad = torch.as_tensor(pad, dtype=torch.int64, device=token_idx.device)
        positions = (token_idx + pad[:, None, None]).clamp(max=cos.shape[2] - 1)
        b = u.shape[0]
        c, s = (gather_positions(t.float().expand(b, *t.shape[1:]), positions) for t in (cos, sin))
        x, rest = keys[..., :width], keys[..., width:]
        h = width // 2
        if rope_form == "rotate_half":
            rotated = torch.cat([-x[..., h:], x[..., :h]], dim=-1)
        else:
            c, s = c[..., :h].repeat_interleave(2, dim=-1), s[..., :h].repeat_interleave(2, dim=-1)
            rotated = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)
        keys = torch.cat([x * c + rotated * s, rest], dim=-1)
    return keys.to(dtype or sv.dtype)


def gather_value_chunks(v_chunks: torch.Tensor, chunk_idx: torch.Tensor, device: torch.device,
                        scales: torch.Tensor | None = None) -> torch.Tensor:
    """Twin of ``triton_gather.gather_value_chunks``: values of chosen chunks, read from (host)
    memory and moved to ``device``.

    Args:
        v_chunks: ``[B, Hkv, C, L, D]`` (pinned host memory when the model is on a GPU); int8
            codes with ``scales``.
        chunk_idx: ``[B, Hkv, k]`` int64 on any device.
        scales: optional ``[B, Hkv, C]`` float32 on ``device``: the codes are moved as int8, then
            dequantised there (``quantize.dequantize``).
    Returns:
        ``[B, Hkv, k*L, D]`` on ``device`` (float32 when dequantised).
    """
    b, hkv, c, l, d = v_chunks.shape
    idx = chunk_idx.to(v_chunks.device)
    picked = torch.gather(v_chunks, 2, idx[..., None, None].expand(-1, -1, -1, l, d)).to(device, non_blocking=True)
    if scales is not None:
        picked = dequantize(picked, torch.gather(scales, 2, idx.to(scales.device)))
    return picked.reshape(b, hkv, -1, d)


def gather_fetching(v_chunks: torch.Tensor, chunk_idx: torch.Tensor, fetch: torch.Tensor, out: torch.Tensor,
                    scales: torch.Tensor | None = None) -> torch.Tensor:
    """Twin of ``triton_gather.gather_value_chunks`` with ``fetch``: ``gather_value_chunks`` into
    ``out [B, Hkv, k*L, D]``, writing only the chunks where ``fetch`` (the others already hold
    their values)."""
    b, hkv, c, l, d = v_chunks.shape
    values = gather_value_chunks(v_chunks, chunk_idx, out.device, scales).to(out.dtype).view(b, hkv, -1, l, d)
    view = out.view(b, hkv, -1, l, d) if out.is_contiguous() else out.unflatten(2, (-1, l))
    view.copy_(torch.where(fetch[..., None, None], values, view))
    return out


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """One softmax over the given keys, GQA-aware.

    Args:
        q: ``[B, Hq, n, D]``; k, v: ``[B, Hkv, N, D]``.
        allowed: bool, broadcastable to ``[B, Hkv, n, N]``; every query row must allow one key.
    Returns:
        ``[B, Hq, n, D]``.
    """
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    mask = allowed.expand(b, hkv, n, k.shape[2])
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        mask = mask.repeat_interleave(group, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def decode_mask(key_valid: torch.Tensor, keys: int, tail_start: int, tail_fill: torch.Tensor, n: int,
                tail_first: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, Hkv, n, N]`` bool: what each of ``n`` new queries may attend in a ``[prefix | tail]`` buffer.

    Prefix keys by ``key_valid [B, Hkv, >= tail_start]``; tail slot ``t`` for query ``i`` iff
    ``tail_first[b] <= t <= fill - n + i`` (``tail_fill``: a 0-dim device tensor, never read on the
    host; ``tail_first [B]``: slots a row has folded into its compressed store, default none).
    """
    b, hkv = key_valid.shape[:2]
    prefix = key_valid[..., :tail_start].bool()[:, :, None, :].expand(b, hkv, n, tail_start)
    tail_pos = torch.arange(keys - tail_start, device=key_valid.device)
    query_pos = tail_fill.reshape(()) - n + torch.arange(n, device=key_valid.device)
    tail = (tail_pos[None, :] <= query_pos[:, None])[None, None].expand(b, hkv, n, -1)
    if tail_first is not None:
        tail = tail & (tail_pos >= tail_first.reshape(b, 1, 1, 1))
    return torch.cat([prefix, tail], dim=-1)


def decode_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, key_valid: torch.Tensor,
                     tail_start: int, tail_fill: torch.Tensor, scale: float,
                     tail_first: torch.Tensor | None = None) -> torch.Tensor:
    """Twin of ``triton_decode_attention.decode_attention``: the explicit ``[B, Hkv, n, N]`` mask and one SDPA.

    Same arguments and result; no host sync either (the fill level stays a tensor).
    """
    mask = decode_mask(key_valid, k_buf.shape[2], tail_start, tail_fill, q.shape[2], tail_first)
    return masked_attention(q, k_buf, v_buf, mask, scale)
