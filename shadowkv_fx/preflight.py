"""Before a batch is prefilled: will its compressed state and offloaded values fit?

A batch that cannot fit is refused before any work, naming the largest batch of these prompts
that does, instead of failing half-way through prefill (or worse, swapping the host to death).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from shadowkv_fx.config import ShadowKVConfig
from shadowkv_fx.layer_state import PromptLayout

HOST_SHARE = 0.9  # of MemAvailable that pinned values may take


@dataclass
class Footprint:
    """Bytes one sequence needs over all layers: on the device, and of values (host or device)."""

    device: int
    values: int


def footprint(model_config, layout: PromptLayout, config: ShadowKVConfig, dtype: torch.dtype,
              tail_capacity: int) -> list[Footprint]:
    """Per sequence of ``layout``, what ``LayerState`` will allocate for it (DESIGN.md §4)."""
    layers = model_config.num_hidden_layers
    hkv = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
    d = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    size = torch.finfo(dtype).bits // 8
    chunk, c_max = config.chunk_size, layout.max_chunks
    select = min(config.budget_chunks, max([c - config.outlier_chunks for c in layout.chunks if c], default=0))
    local = max(n - c * chunk for n, c in zip(layout.lengths, layout.chunks))
    fold_keys = 0
    if c_max and config.folds:
        # the store is preallocated for every token that may fold; the dense tail for the fold window
        c_max = -(-(max(layout.lengths) + tail_capacity) // chunk)
        select = max(1, min(config.budget_chunks, c_max - config.outlier_chunks))
        if all(layout.chunks):
            tail_capacity = min(tail_capacity, config.fold_window)
        fold_keys = (local + tail_capacity) * hkv * d * size
    kv_token = 2 * hkv * d * size
    dense_tokens = local + tail_capacity + (config.outlier_chunks + select) * chunk if c_max else local + tail_capacity
    device = dense_tokens * kv_token + fold_keys
    if c_max:
        device += (c_max * chunk * config.rank + hkv * config.rank * d + hkv * c_max * d) * size + hkv * c_max
    values = hkv * c_max * chunk * d * size
    return [Footprint(layers * device, layers * values) for _ in layout.lengths]


def _host_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    except OSError:
        return None
    return info.get("MemAvailable")


def check_batch_fits(model_config, layout: PromptLayout, config: ShadowKVConfig, dtype: torch.dtype,
                     device: torch.device, tail_capacity: int) -> None:
    """Raise ``MemoryError`` naming the largest batch that fits, if this one does not."""
    if device.type != "cuda":
        return  # a CPU model keeps its values where they are: nothing is pinned or moved
    need = footprint(model_config, layout, config, dtype, tail_capacity)
    per_seq = need[0]
    batch = len(need)
    free, total = torch.cuda.mem_get_info(device)
    from shadowkv_fx.cache import DEVICE_RESERVE

    room = free - DEVICE_RESERVE * total
    state = per_seq.device * batch
    if state > max(room, 0):
        fits = int(max(room, 0) // max(per_seq.device, 1))
        raise MemoryError(
            f"this batch's compressed ShadowKV state needs {state / 2**30:.1f} GiB of GPU memory "
            f"({per_seq.device / 2**30:.2f} GiB per sequence) but {max(room, 0) / 2**30:.1f} GiB is free beyond "
            f"the {DEVICE_RESERVE:.0%} kept for prefill and decode work: the largest batch of these prompts "
            f"that fits is {fits}; use a smaller batch or shorter prompts"
        )
    cap = config.value_hbm_gib
    on_device = min(room - state, float("inf") if cap is None else cap * 2**30)
    host_need = per_seq.values * batch - max(on_device, 0)
    available = _host_available()
    if available is None or host_need <= HOST_SHARE * available:
        return
    fits = int((HOST_SHARE * available + max(on_device, 0)) // max(per_seq.values, 1))
    raise MemoryError(
        f"offloading this batch's values needs {host_need / 2**30:.1f} GiB of pinned host memory "
        f"({per_seq.values / 2**30:.2f} GiB per sequence) but {available / 2**30:.1f} GiB is available: the "
        f"largest batch of these prompts that fits is {fits}; use a smaller batch or shorter prompts"
    )
