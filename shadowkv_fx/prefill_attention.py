"""Attention at prefill: dense and causal per sequence, over a prompt that may go through the
model in pieces (``prefill_chunk_size``) and groups of rows (``prefill_rows``); the cache
compresses each layer once a group's whole prompt has passed."""
from __future__ import annotations

import warnings

import torch
from torch.nn.attention.bias import causal_lower_right

from shadowkv_fx.column_staging import column_buffers, write_columns
from shadowkv_fx.prompt_layout import PromptLayout


def stage_piece(staged: dict[int, tuple[torch.Tensor, ...]], layer_idx: int, span: tuple[int, int], total: int,
                parts: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Append one piece's ``parts`` (keys, values and RoPE inputs ``[rows, *, span, *]`` of the
    padded prompt's columns ``span``) to the layer's prompt so far, held in ``staged`` until the
    last piece (of ``total`` columns); return the prompt so far."""
    start, end = span
    if start == 0 and end == total:
        return parts
    if start == 0:
        staged[layer_idx] = tuple(column_buffers(parts, total))
    so_far = tuple(write_columns(staged[layer_idx], parts, start, end))
    if end == total:
        del staged[layer_idx]
    return so_far


def dense_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PromptLayout, scale: float,
                  start: int = 0) -> torch.Tensor:
    """Causal attention per sequence over its real tokens; pad rows are zero (never read).

    ``q [B, Hq, n, D]`` holds padded-prompt columns ``[start, start + n)``; ``k, v [B, Hkv, start + n, D]``.
    """
    out = torch.zeros_like(q)
    group = q.shape[1] // k.shape[1]
    end = k.shape[2]
    for b, pad in enumerate(layout.pad):
        first = max(pad, start)
        if first >= end:
            continue
        # explicit head repeat: SDPA's flash kernel takes no GQA, and the math fallback would
        # materialise S x S scores per head
        kb = k[b : b + 1, :, pad:].repeat_interleave(group, dim=1)
        vb = v[b : b + 1, :, pad:].repeat_interleave(group, dim=1)
        qb = q[b : b + 1, :, first - start :]
        if first == pad:
            attended = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale)
        else:
            attended = later_piece(qb, kb, vb, scale)
        out[b : b + 1, :, first - start :] = attended
    return out


def later_piece(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of a later piece's queries ``q [1, H, n, D]`` (the last ``n`` of the prompt
    so far) over the prompt so far ``k, v [1, H, S, D]``: each query sees every earlier key and the
    piece's keys up to its own.

    On a GPU in 16 bits, two unmasked cuDNN calls merged by their log-sum-exps (the earlier keys
    whole, the piece's own keys causal: a square, so SDPA's top-left causal is the right one), as
    torch's context parallelism merges ring blocks. One call under SDPA's lower-right causal bias
    is the same attention, but torch runs that bias on flash attention 2: on the H100 a 122K
    prompt's attention in pieces took 1.77x the one-piece prefill's cuDNN kernel, ~5 s of a
    document's admission (``benchmarks/results/h100_prefill_pieces_profile/``). Elsewhere (CPU, 32
    bits, cuDNN off), or where the split disagrees with the bias on a small check or is refused,
    the lower-right bias."""
    if _split_runs(q):
        try:
            return _split(q, k, v, scale)
        except RuntimeError as err:  # a shape or layout this cuDNN refuses: the slower kernel from now on
            _refuse(q, f"cuDNN attention refused a prefill piece ({err})")
    return _lower_right(q, k, v, scale)


def merge_partial(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """Attention over keys A and B from attention over each (outputs ``[.., n, D]``, natural-log
    log-sum-exps of the scaled scores ``[.., n, 1]``), in float32; the sigmoid form (ring flash
    attention's) stays finite where one side's log-sum-exp is far below the other's."""
    out_a, out_b = out_a.float(), out_b.float()
    return out_a - torch.sigmoid(lse_b.float() - lse_a.float()) * (out_a - out_b)


def _lower_right(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    mask = causal_lower_right(q.shape[2], k.shape[2])
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _split(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    earlier = k.shape[2] - q.shape[2]
    before = _cudnn_with_lse(q, k[:, :, :earlier], v[:, :, :earlier], False, scale)
    own = _cudnn_with_lse(q, k[:, :, earlier:], v[:, :, earlier:], True, scale)
    return merge_partial(*before, *own).to(q.dtype)


def _cudnn_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False,
                                                                  scale=scale)[:2]
    return out, lse.reshape(*q.shape[:3], 1)


# (device, dtype, head dim) -> whether the split runs there: checked once against the bias on a small
# problem, as the cuDNN op is torch-internal (its log-sum-exp layout is not a documented contract)
_SPLIT_AGREES: dict[tuple, bool] = {}


def _split_runs(q: torch.Tensor) -> bool:
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and torch.backends.cuda.cudnn_sdp_enabled()
            and torch.backends.cudnn.is_available()):
        return False
    key = (q.device, q.dtype, q.shape[-1])
    if key not in _SPLIT_AGREES:
        _SPLIT_AGREES[key] = True
        gen = torch.Generator(device=q.device).manual_seed(0)
        small_q, small_k, small_v = (torch.randn(1, 2, n, q.shape[-1], generator=gen, device=q.device, dtype=q.dtype)
                                     for n in (64, 192, 192))
        scale = q.shape[-1] ** -0.5
        try:
            split = _split(small_q, small_k, small_v, scale)
        except RuntimeError as err:
            _refuse(q, f"cuDNN attention refused a prefill piece ({err})")
        else:
            error = (split.float() - _lower_right(small_q, small_k, small_v, scale).float()).abs().max().item()
            if not error < 2e-2:
                _refuse(q, f"cuDNN attention of a prefill piece split in two differs from the lower-right bias "
                           f"by {error:.3g}")
    return _SPLIT_AGREES[key]


def _refuse(q: torch.Tensor, why: str) -> None:
    _SPLIT_AGREES[(q.device, q.dtype, q.shape[-1])] = False
    warnings.warn(f"{why}; later prefill pieces use flash attention 2 (slower, the same attention)")
