"""Where a compressed store's values live, and how big the slots of a running cache are."""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from shadowkv_fx.pinned import pinned_zeros
from shadowkv_fx.preflight import check_host_memory


def value_slots(shape: tuple[int, ...], like: torch.Tensor, keep_on_device: Callable[[int], bool]) -> torch.Tensor:
    """Zeroed slots for the chunked values: in spare accelerator memory when ``keep_on_device``
    grants the bytes, else in pinned host memory (plain memory on a CPU model)."""
    nbytes = math.prod(shape) * like.element_size()
    if like.device.type == "cpu" or keep_on_device(nbytes):
        return like.new_zeros(shape)
    check_host_memory(nbytes)
    return pinned_zeros(shape, like.dtype)


class SlotSizes(NamedTuple):
    """Per-row capacities of a running cache's slots (``LayerState.allocate_slots``)."""

    local: int  # local window slots: any prompt's remainder past its chunks, or a whole uncompressed prompt
    store: int  # chunks of the compressed store (0: no prompt that fits can be compressed)
    tail: int  # dense tail slots shared by the rows (grows, rarely: slot_cache.SlotCache.begin_step)
