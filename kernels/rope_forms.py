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


# prompt positions a form check reads at most, spread evenly over the prompt: a form is one rule for every position
# (the positions differ only in their tables), and all of a 122K prompt's keys in float32 are 0.5 GB a layer, each
# form's rotation of them as much again, on top of the prefill's own working set
FORM_CHECK_POSITIONS = 4096


def rope_form_errors(k_pre: torch.Tensor, k_rot: torch.Tensor, tables: list[torch.Tensor]) -> torch.Tensor | None:
    """Each form of ``FORMS``'s error rotating ``k_pre`` into ``k_rot`` (``[B, H, S, D]``, tables ``[B', 1, S, c]``) at
    ``FORM_CHECK_POSITIONS`` of the ``S`` positions at most, relative to ``k_rot``'s norm there: ``[len(FORMS)]``
    float32 on their device, no host sync (``form_from_errors`` reads it); None where the tables fit no form."""
    if len(tables) != 2 or any(t.dim() != 4 or t.shape[-1] > k_pre.shape[-1] or t.shape[-1] % 2 for t in tables):
        return None
    cos, sin = tables
    if cos.shape[-2] != k_pre.shape[-2]:
        return None
    stride = -(-k_pre.shape[-2] // FORM_CHECK_POSITIONS)
    k_pre, k_rot, cos, sin = (t[..., ::stride, :] for t in (k_pre, k_rot, cos, sin))
    k_pre, k_rot = k_pre.float(), k_rot.float()  # once, not once a form
    norm = k_rot.norm().clamp_min(1e-12)
    return torch.stack([(apply_rope(k_pre, cos, sin, form) - k_rot).norm() / norm for form in FORMS])


def form_from_errors(errors: list[float], dtype: torch.dtype) -> str:
    """The first form of ``FORMS`` within the keys' dtype's tolerance (``rope_form_errors``' values), else "generic"."""
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    return next((form for form, err in zip(FORMS, errors) if err < tolerance), "generic")


def rotary_width(cos: torch.Tensor, d: int, rope_form: str) -> int:
    """How many of ``d`` head dims the tables rotate (all of them for ``"none"``, pre-RoPE keys)."""
    forms = ("none", *FORMS)
    if rope_form not in forms:
        raise ValueError(f"rope_form must be one of {sorted(forms)}, got {rope_form!r}")
    width = d if rope_form == "none" else cos.shape[-1]
    if width % 2 or width > d:
        raise ValueError(f"rotary width {width} must be even and at most head dim {d}")
    return width
