"""Where a compressed store's values live (and, at 8 bits, their scales), its landmark rows (or key
codes), and how big the slots of a running cache are."""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from shadowkv_fx import host_copies
from shadowkv_fx.config import ShadowKVConfig
from shadowkv_fx.kernels import quantize
from shadowkv_fx.kernels.compression import CompressedPrompt
from shadowkv_fx.pinned import pinned_zeros
from shadowkv_fx.preflight import check_host_memory


def value_slots(shape: tuple[int, ...], like: torch.Tensor, keep_on_device: Callable[[int], bool],
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """Zeroed slots for the chunked values (of ``dtype``, default ``like``'s): in spare accelerator
    memory when ``keep_on_device`` grants the bytes, else in pinned host memory (plain memory on a
    CPU model)."""
    dtype = dtype or like.dtype
    nbytes = math.prod(shape) * dtype.itemsize
    if like.device.type == "cpu" or keep_on_device(nbytes):
        return like.new_zeros(shape, dtype=dtype)
    check_host_memory(nbytes)
    return pinned_zeros(shape, dtype)


def chunk_slots(shape: tuple[int, ...], like: torch.Tensor, bits: int,
                keep_on_device: Callable[[int], bool] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Zeroed per-chunk storage ``[B, Hkv, C, ...]`` and, at ``bits == 8``, its scales.

    Returns ``(data, scale)``: ``data`` in ``like``'s dtype at 16 bits, int8 at 8; ``scale [B, Hkv, C]``
    float32 on ``like``'s device (None at 16 bits). With ``keep_on_device`` the data are values
    (``value_slots``: pinned host memory unless granted), else they stay on ``like``'s device.
    """
    dtype = like.dtype if bits == 16 else torch.int8
    if keep_on_device is None:
        data = like.new_zeros(shape, dtype=dtype)
    else:
        data = value_slots(shape, like, keep_on_device, dtype)
    scale = None if bits == 16 else torch.zeros(shape[:3], dtype=torch.float32, device=like.device)
    return data, scale


def landmark_slots(config: ShadowKVConfig, chunks: tuple[int, int, int], head_dim: int,
                   like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Zeroed landmark rows for ``chunks = (B, Hkv, C)``: ``(landmarks, landmark_scale, code_scale)``.

    Landmarks ``[B, Hkv, C, runs*D]`` (``chunk_slots``: int8 with ``[B, Hkv, C]`` scales at 8 bits), or
    with ``config.key_code_bits`` every key's packed codes ``[B, Hkv, C, L*D/2]`` uint8 with the rows'
    ``[B, Hkv, 2, D]`` float32 code scales (``kernels/key_codes.py``).
    """
    if config.key_code_bits:
        codes = torch.zeros(*chunks, config.chunk_size * head_dim // 2, dtype=torch.uint8, device=like.device)
        return codes, None, torch.zeros(*chunks[:2], 2, head_dim, device=like.device)
    return (*chunk_slots((*chunks, config.landmark_runs * head_dim), like, config.landmark_bits), None)


def write_landmarks(landmarks: torch.Tensor, landmark_scale: torch.Tensor | None, code_scale: torch.Tensor | None,
                    index: tuple, prompt: CompressedPrompt) -> None:
    """One row's compressed prompt into its landmark rows
    ``index = (row, heads, chunks)``: int8 at 8 bits, or key codes with the row's code scales."""
    write_chunks(landmarks, landmark_scale, index, prompt.landmarks)
    if code_scale is not None:
        code_scale[index[0]] = prompt.code_scale


def write_chunks(data: torch.Tensor, scale: torch.Tensor | None, index: tuple, x: torch.Tensor,
                 side_stream: bool = False) -> torch.cuda.Event | None:
    """``data[index] = x``, quantised first where ``scale`` is given (``scale[index]`` gets its scales).

    ``index`` picks ``[rows, Hkv heads, chunks]`` (the dims ``scale`` has); ``x [..., *inner]``
    holds those chunks' elements (``[L, D]`` a value chunk, ``[D]`` a landmark). Quantised on
    ``x``'s device, so only int8 bytes travel. ``side_stream``: ``data[index]`` is a view, copied
    by ``host_copies.copy`` (the returned event marks its end); else a plain indexed write.
    """
    if scale is not None:
        x, scale[index] = quantize.quantize(x, data.dim() - scale.dim())
    if side_stream:
        return host_copies.copy(data[index], x)
    data[index] = x.to(data.device, data.dtype)
    return None


class SlotSizes(NamedTuple):
    """Per-row capacities of a running cache's slots (``LayerState.allocate_slots``)."""

    local: int  # local window slots: any prompt's remainder past its chunks, or a whole uncompressed prompt
    store: int  # chunks of the compressed store (0: no prompt that fits can be compressed)
    tail: int  # dense tail slots shared by the rows (grows, rarely: slot_cache.SlotCache.begin_step)
