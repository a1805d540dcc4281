"""8-bit storage of the chunked values and landmarks (``ShadowKVConfig.value_bits`` / ``landmark_bits``).

int8 with one float32 scale per (chunk, KV head), symmetric absmax: ``scale = max|x| / 127``,
``q = round(x / scale)``, so ``|x - q * scale| <= scale / 2`` for every element. Chosen over fp8
e4m3 because

- it runs everywhere the rest does: fp8 loads and conversions need sm89+ (an A100 has none) and the
  Triton CPU interpreter has no fp8, so the CPU tests could not run the dequantising kernels;
- a chunk's values (or a chunk's landmark, one per KV head) share one magnitude, so uniform steps
  of ``max / 127`` lose less than e4m3's 3 mantissa bits (a relative step of 1/16 near the top);
- the scale costs 4 bytes per ``L * D`` elements (0.4% at ``L = 8, D = 128``) and stays on the
  device: a gathered chunk's scale never crosses PCIe.

The int8 codes fit bf16 exactly (|q| <= 127 < 256), so the score kernel feeds them to the same
dot as bf16 landmarks and scales the logits after it. Plain torch, run at prefill and at folds
(not per step): no Triton twin.
"""
from __future__ import annotations

import torch

QMAX = 127  # symmetric: -128 is never produced, so negating a code cannot overflow


def quantize(x: torch.Tensor, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 of ``x``, one scale per index of its leading dims.

    Parameters
    ----------
    x : torch.Tensor
        ``[*lead, *inner]`` float, where ``inner`` is the last ``dims`` dims (``[L, D]`` of a value
        chunk, ``[D]`` of a landmark).
    dims : int
        How many trailing dims share one scale (>= 1).

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        ``q [*lead, *inner]`` int8 and ``scale [*lead]`` float32 with ``x ~= q * scale``
        (an all-zero group has scale 0 and codes 0).
    """
    if dims < 1 or dims > x.dim():
        raise ValueError(f"dims must be in 1..{x.dim()} for a {x.dim()}-d tensor, got {dims}")
    xf = x.float()
    scale = xf.abs().amax(dim=tuple(range(x.dim() - dims, x.dim()))) / QMAX
    # a zero group divides by 1 instead of 0 (its codes are 0 either way)
    step = torch.where(scale > 0, scale, torch.ones_like(scale)).reshape(*scale.shape, *([1] * dims))
    q = torch.round(xf / step).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale`` in float32, cast to ``dtype`` (as the gather kernel does per element).

    ``q [*lead, *inner]`` int8, ``scale [*lead]`` float32 -> ``[*lead, *inner]`` of ``dtype``.
    """
    dims = q.dim() - scale.dim()
    return (q.float() * scale.float().reshape(*scale.shape, *([1] * dims))).to(dtype)
