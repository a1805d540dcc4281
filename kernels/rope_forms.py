"""The RoPE forms the fused key-rebuild kernel applies, recognised from the model's own output.

The pass cuts each site's key-RoPE region out as an opaque function. Rather than read the model's
code, prefill checks which known form reproduces that function's output on the real keys: a
match lets decode rebuild and rotate keys in one Triton kernel; no match keeps the model's own
function (``"generic"``), so an unknown RoPE is never approximated.
"""
from __future__ import annotations

import torch

FORMS = ("rotate_half", "interleaved")


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, form: str) -> torch.Tensor:
    """``x [..., D]`` rotated by tables ``[..., R]`` (``R <= D``: dims past ``R`` pass through).

    ``rotate_half``: Llama's ``x*cos + cat(-x[R/2:], x[:R/2])*sin``. ``interleaved``: GLM's pairs
    ``(x[2i], x[2i+1])`` rotated by column ``i`` of tables laid out as ``cat(freqs, freqs)``.
    """
    r = cos.shape[-1]
    rot, rest = x[..., :r].float(), x[..., r:]
    cos, sin = cos.float(), sin.float()
    if form == "rotate_half":
        turned = torch.cat([-rot[..., r // 2 :], rot[..., : r // 2]], dim=-1)
    elif form == "interleaved":
        cos = cos[..., : r // 2].repeat_interleave(2, dim=-1)
        sin = sin[..., : r // 2].repeat_interleave(2, dim=-1)
        turned = torch.stack([-rot[..., 1::2], rot[..., 0::2]], dim=-1).flatten(-2)
    else:
        raise ValueError(f"unknown RoPE form {form!r}; known: {FORMS}")
    return torch.cat([(rot * cos + turned * sin).to(x.dtype), rest], dim=-1)


def detect_rope_form(k_pre: torch.Tensor, k_rot: torch.Tensor, tables: list[torch.Tensor]) -> str:
    """The form in ``FORMS`` whose rotation of ``k_pre`` gives ``k_rot`` (``[B, H, S, D]``), else "generic"."""
    if len(tables) != 2 or any(t.dim() != 4 or t.shape[-1] > k_pre.shape[-1] or t.shape[-1] % 2 for t in tables):
        return "generic"
    cos, sin = tables
    if cos.shape[-2] != k_pre.shape[-2]:
        return "generic"
    tolerance = 1e-4 if k_rot.dtype == torch.float32 else 2e-2
    norm = k_rot.float().norm().clamp_min(1e-12)
    for form in FORMS:
        err = (apply_rope(k_pre.float(), cos, sin, form) - k_rot.float()).norm() / norm
        if err < tolerance:
            return form
    return "generic"


def rotary_width(cos: torch.Tensor, d: int, rope_form: str) -> int:
    """How many of ``d`` head dims the tables rotate (all of them for ``"none"``, pre-RoPE keys)."""
    forms = ("none", *FORMS)
    if rope_form not in forms:
        raise ValueError(f"rope_form must be one of {sorted(forms)}, got {rope_form!r}")
    width = d if rope_form == "none" else cos.shape[-1]
    if width % 2 or width > d:
        raise ValueError(f"rotary width {width} must be even and at most head dim {d}")
    return width
