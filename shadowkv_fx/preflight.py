"""Before a batch is prefilled: will its compressed state and offloaded values fit?

A batch that cannot fit is refused before any work, naming the largest batch of these prompts
that does, instead of failing half-way through prefill (or worse, swapping the host to death).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from shadowkv_fx.config import ShadowKVConfig
from shadowkv_fx.host_memory import meminfo_available
from shadowkv_fx.pinned import POOL, registered_bytes
from shadowkv_fx.prompt_layout import PromptLayout, store_chunks, tail_slots

HOST_SHARE = 0.9  # of MemAvailable that pinned values may take
# beyond the prefill working set: CUDA-graph pools, allocator fragmentation, cuBLAS/inductor
# workspaces, decode temporaries
WORK_MARGIN_BYTES = 2**30
WORK_MARGIN_SHARE = 0.02
# kept free instead, at least, when the caching allocator's segments are fixed: the state, values
# and prefill temporaries of many sizes fragment them (an H100 at 122K x 16 ran out of memory with
# 58.5 of 79.2 GiB allocated); a quarter held at 122K x 15 (random fill) and x 12 (real prefill)
FRAGMENTED_RESERVE_SHARE = 0.25
EXPANDABLE_HINT = ("; with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True set before CUDA starts "
                   "(the shadowkv-fx CLI sets it) {} would fit")


def expandable_segments() -> bool:
    """Whether torch's CUDA caching allocator grows segments in place (no fragmentation between
    allocations of different sizes), as ``PYTORCH_CUDA_ALLOC_CONF`` asks before CUDA starts."""
    conf = ",".join(os.environ.get(name, "") for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"))
    return "expandable_segments:true" in conf.replace(" ", "").lower()


@dataclass
class Footprint:
    """Bytes one sequence needs over all layers: on the device, and of values (host or device)."""

    device: int
    values: int
    layers: int = 1  # values are allocated one layer at a time (each rounded by the host allocator)


def footprint(model_config, layout: PromptLayout, config: ShadowKVConfig, dtype: torch.dtype,
              tail_capacity: int, tp_size: int = 1) -> list[Footprint]:
    """Per sequence of ``layout``, what ``LayerState`` will allocate for it (DESIGN.md §4), on
    one of ``tp_size`` tensor-parallel ranks (each holds its share of the KV heads)."""
    _, hkv, d = head_shape(model_config)
    one = state_footprint(model_config.num_hidden_layers, hkv // tp_size, d, dtype, layout, config, tail_capacity)
    return [one for _ in layout.lengths]


def head_shape(model_config) -> tuple[int, int, int]:
    """``(attention heads, KV heads, head dim)`` of a transformers config (KV heads default to the
    attention heads, head dim to ``hidden_size / heads``, as the models do)."""
    heads = model_config.num_attention_heads
    hkv = getattr(model_config, "num_key_value_heads", None) or heads
    d = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    return heads, hkv, d


def state_footprint(layers: int, hkv: int, d: int, dtype: torch.dtype, layout: PromptLayout,
                    config: ShadowKVConfig, tail_capacity: int) -> Footprint:
    """One sequence's bytes over ``layers`` layers of ``hkv`` KV heads of width ``d``: the
    compressed state, decode buffers and workspace on the device; the values (host or device).

    With folding the store (``U``, landmarks, values) is preallocated for the prompt and
    ``tail_capacity`` generated tokens, the dense tail only for the fold window, and the device
    also keeps the dense tokens' pre-RoPE keys, the outliers' ids and min-cosines and the RoPE
    inputs of the generated tokens (``fold.py``). At 8 bits (``value_bits``, ``landmark_bits``)
    values or landmarks take one byte an element, plus a float32 scale per chunk and KV head on the
    device.
    """
    if config.layer_budgets is not None:  # each layer's own budget: one layer at a time, the RoPE tables once
        plain = replace(config, layer_budgets=None, dense_layers=())
        shared = state_footprint(0, hkv, d, dtype, layout, plain, tail_capacity).device
        parts = [state_footprint(1, hkv, d, dtype, layout, replace(plain, sparse_budget=config.layer_budgets[i]),
                                 tail_capacity) for i in range(layers) if i not in config.dense_layers]
        dense = (layers - len(parts)) * dense_layer_bytes(hkv, d, dtype, layout, plain, tail_capacity)
        return Footprint(sum(p.device - shared for p in parts) + shared + dense, sum(p.values for p in parts),
                         len(parts))
    dense = sum(1 for i in config.dense_layers if i < layers)
    if dense:  # kept whole, as prompts too short to compress are (dense_fallback.layer_layouts)
        plain = replace(config, dense_layers=())
        rest = state_footprint(layers - dense, hkv, d, dtype, layout, plain, tail_capacity) if dense < layers \
            else Footprint(0, 0)
        return Footprint(rest.device + dense * dense_layer_bytes(hkv, d, dtype, layout, plain, tail_capacity),
                         rest.values, rest.layers)
    size = torch.finfo(dtype).bits // 8
    v_size, lm_size = (size if bits == 16 else 1 for bits in (config.value_bits, config.landmark_bits))
    chunk, c_max = config.chunk_size, layout.max_chunks
    local = max(n - c * chunk for n, c in zip(layout.lengths, layout.chunks))
    folds = bool(c_max) and config.folds
    tail = tail_capacity
    fold_state, rope_columns = 0, layout.padded_len
    if folds:
        c_max = store_chunks(layout.lengths, tail_capacity, chunk)
        tail = tail_slots(config, layout.chunks, tail_capacity)
        fold_state = (local + tail) * hkv * d * size + hkv * config.outlier_chunks * (8 + 4)
        rope_columns += tail_capacity
    select = config.select_chunks(c_max)
    kv_token = 2 * hkv * d * size
    dense_tokens = local + tail + (config.outlier_chunks + select) * chunk if c_max else local + tail
    device = dense_tokens * kv_token + fold_state
    if c_max:
        device += (c_max * chunk * config.rank + hkv * config.rank * d) * size + hkv * c_max  # U, SV, selectable
        if config.key_code_bits:  # every key's codes, half a byte a channel, and a step and low per channel
            device += hkv * c_max * chunk * d // 2 + hkv * 2 * d * 4
        else:
            device += hkv * c_max * config.landmark_runs * d * lm_size
        device += 4 * hkv * c_max * ((config.value_bits == 8) + (config.landmark_bits == 8))  # the scales
        device += hkv * select * 8  # the chunk each selected slot holds (value reuse)
    rope_tables = 2 * rope_columns * d * size  # cos and sin per position, shared by the layers
    if len(set(layout.pad)) == 1:  # and by the sequences of one padded layout (rope_tables.SharedRopeTables)
        rope_tables //= len(layout.lengths)
    return Footprint(layers * device + rope_tables, layers * hkv * c_max * chunk * d * v_size, layers)


def dense_layer_bytes(hkv: int, d: int, dtype: torch.dtype, layout: PromptLayout, config: ShadowKVConfig,
                      tail_capacity: int) -> int:
    """Device bytes of one sequence's layer kept dense (``dense_layers``, or failing a measured bound):
    a short prompt's state (the whole prompt and the generated tail), less the RoPE tables, which
    such a layer does not read."""
    whole = PromptLayout(layout.pad, layout.lengths, [0] * len(layout.lengths), layout.padded_len)
    one, none = (state_footprint(n, hkv, d, dtype, whole, config, tail_capacity).device for n in (1, 0))
    return one - none


def pinned_bytes(nbytes: int) -> int:
    """Host memory a layer's pinned values of ``nbytes`` take: whole pages (``pinned.pinned_zeros``
    registers exactly that; torch's caching host allocator would round up to a power of two)."""
    return registered_bytes(nbytes)


def _host_available() -> int | None:
    """Host memory this process may pin: MemAvailable, split evenly between the ranks of a
    ``torchrun`` on this host (they pin at the same time)."""
    available = mem_available()
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return None if available is None else available // max(ranks_here, 1)


def mem_available() -> int | None:
    """The host's MemAvailable in bytes, plus this process's free pinned blocks (None without
    /proc/meminfo)."""
    available = meminfo_available()
    # blocks pinned for an earlier cache and free again are this process's to reuse
    return None if available is None else available + POOL.pooled_bytes()


def check_host_memory(nbytes: int) -> None:
    """Raise ``MemoryError`` if one layer's values of ``nbytes`` cannot be pinned: prefill checks
    each layer as it offloads it, also where no preflight counted the batch first."""
    needed, available = pinned_bytes(nbytes), mem_available()
    if available is not None and needed > HOST_SHARE * available:
        raise MemoryError(
            f"offloading values needs {needed / 2**30:.1f} GiB of pinned host memory but only "
            f"{available / 2**30:.1f} GiB is available: use a smaller batch or a shorter prompt"
        )


@dataclass
class Capacity:
    """How many sequences like the first of a layout fit, by GPU memory and by host memory."""

    by_device: int
    by_host: int | None  # None: host memory unknown (no /proc/meminfo)
    per_seq: Footprint
    room: float  # GPU bytes free beyond the reserve kept for prefill and decode work

    @property
    def largest(self) -> int:
        return self.by_device if self.by_host is None else min(self.by_device, self.by_host)

    @property
    def bound(self) -> str:
        return "host memory (pinned values)" if self.by_host is not None and self.by_host < self.by_device \
            else "GPU memory (compressed state)"


def work_reserve(model_config, layout: PromptLayout, config: ShadowKVConfig, dtype: torch.dtype, total: int,
                 tp_size: int = 1, expandable: bool | None = None) -> int:
    """GPU bytes kept free of state and values for one prefill group's working set, plus a margin.

    Per prompt token of the group (``prefill_rows`` rows padded to the longest): four hidden-wide
    activations (the residual stream, the attention output, its projection and the MLP's output),
    the queries before and after RoPE, six KV-wide tensors (keys, values, rotated and staged
    copies) and the float32 keys the low-rank fit reads (4 bytes, twice); plus the MLP
    intermediates (gate, up and their product) of one ``prefill_mlp_chunk`` of tokens (of every
    token when the chunking is off). On an H100, Llama-3.1-8B shape, one 122K prompt without the
    chunking: a ~15 GiB working set (peak 40.1 GiB less 14.96 GiB of weights and 9.99 GiB of state
    and values), ~10 GiB of it the MLP's; with it (peak 35.6 GiB) 10.7 GiB. This counts 7.96 GiB
    + 0.66 GiB of MLP chunk, and the margin 2.6 GiB. Without expandable segments (``expandable``,
    default from the environment) at least ``FRAGMENTED_RESERVE_SHARE`` of the device.
    """
    heads, hkv, d = head_shape(model_config)
    q_width, kv_width = heads * d // tp_size, hkv * d // tp_size
    inter = (getattr(model_config, "intermediate_size", None) or 4 * model_config.hidden_size) // tp_size
    rows = min(config.prefill_rows or len(layout.lengths), len(layout.lengths))
    tokens = rows * layout.padded_len
    mlp_tokens = tokens if config.prefill_mlp_chunk is None else min(tokens, config.prefill_mlp_chunk)
    size = torch.finfo(dtype).bits // 8
    per_token = size * (4 * model_config.hidden_size + 2 * q_width + 6 * kv_width) + 8 * kv_width
    work = tokens * per_token + 3 * mlp_tokens * inter * size
    reserve = work + WORK_MARGIN_BYTES + WORK_MARGIN_SHARE * total
    if not (expandable_segments() if expandable is None else expandable):
        reserve = max(reserve, FRAGMENTED_RESERVE_SHARE * total)
    return int(reserve)


def device_memory(device: torch.device) -> tuple[int, int]:
    """``(free, total)`` bytes of ``device``, counting as free what torch's caching allocator holds
    but does not use (blocks freed by an earlier prefill): the driver reports those as taken."""
    free, total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free + max(cached, 0), total


def capacity(model_config, layout: PromptLayout, config: ShadowKVConfig, dtype: torch.dtype,
             device: torch.device, tail_capacity: int, tp_size: int = 1, expandable: bool | None = None) -> Capacity:
    """Largest batch of prompts like ``layout``'s first: the compressed state must fit the GPU
    beyond the reserve; values fill what GPU room is left (up to ``value_hbm_gib``), then pinned host."""
    per_seq = footprint(model_config, layout, config, dtype, tail_capacity, tp_size)[0]
    free, total = device_memory(device)
    room = max(free - work_reserve(model_config, layout, config, dtype, total, tp_size, expandable), 0)
    by_device = int(room // max(per_seq.device, 1))
    available = _host_available()
    if available is None:
        return Capacity(by_device, None, per_seq, room)
    by_host = 0
    while by_host < by_device:  # values on the GPU take the room the state leaves, a layer at a time
        batch = by_host + 1
        layer_values = per_seq.values // per_seq.layers * batch
        on_device = values_room(room, per_seq, batch, config)
        host_layers = per_seq.layers - min(int(on_device // max(layer_values, 1)), per_seq.layers)
        if host_layers * pinned_bytes(layer_values) > HOST_SHARE * available:
            break
        by_host = batch
    return Capacity(by_device, by_host, per_seq, room)


def values_room(room: float, per_seq: Footprint, batch: int, config: ShadowKVConfig) -> int:
    """GPU bytes values may take: ``room`` less the batch's compressed state, within ``value_hbm_gib``."""
    cap = float("inf") if config.value_hbm_gib is None else config.value_hbm_gib * 2**30
    return int(max(min(room - per_seq.device * batch, cap), 0))


def check_batch_fits(model_config, layout: PromptLayout, config: ShadowKVConfig, dtype: torch.dtype,
                     device: torch.device, tail_capacity: int, tp_size: int = 1) -> int | None:
    """Raise ``MemoryError`` naming the largest batch that fits, if this one does not; else return
    the GPU bytes its values may take (planned now, before prefill allocates anything, so the
    prefill grants exactly what this check counted on). None for a CPU model."""
    if device.type != "cuda":
        return None  # a CPU model keeps its values where they are: nothing is pinned or moved
    fit = capacity(model_config, layout, config, dtype, device, tail_capacity, tp_size)
    batch, per_seq = len(layout.lengths), fit.per_seq
    if batch <= fit.largest:
        return values_room(fit.room, per_seq, batch, config)
    hint = ""
    if not expandable_segments():
        unfragmented = capacity(model_config, layout, config, dtype, device, tail_capacity, tp_size, expandable=True)
        if unfragmented.largest > fit.largest:
            hint = EXPANDABLE_HINT.format(f"up to {unfragmented.largest}" if batch > unfragmented.largest else "it")
    if batch > fit.by_device:
        raise MemoryError(
            f"this batch's compressed ShadowKV state needs {per_seq.device * batch / 2**30:.1f} GiB of GPU memory "
            f"({per_seq.device / 2**30:.2f} GiB per sequence) but {fit.room / 2**30:.1f} GiB is free beyond "
            f"the share kept for prefill and decode work: the largest batch of these prompts "
            f"that fits is {fit.by_device}; use a smaller batch or shorter prompts{hint}{_fallback_note(config)}"
        )
    raise MemoryError(
        f"offloading this batch's values needs more pinned host memory than is available "
        f"({per_seq.values / 2**30:.2f} GiB per sequence, {_host_available() / 2**30:.1f} GiB available): the "
        f"largest batch of these prompts that fits is {fit.by_host}; use a smaller batch or shorter prompts{hint}"
    )


def _fallback_note(config: ShadowKVConfig) -> str:
    """What the count above leaves out: prompts the measured bounds keep dense are known only at prefill."""
    bounds = [f"{name}={getattr(config, name)}" for name in ("dense_fallback_error", "dense_fallback_recall")
              if getattr(config, name) is not None]
    if not bounds:
        return ""
    return (f" (not counted: {' and '.join(bounds)} may keep a sequence's prompt dense in any layer, its whole "
            "K/V on the GPU; dense_layers are counted)")
