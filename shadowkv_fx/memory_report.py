"""Bytes of a ShadowKV cache per component and per device that holds them
(``ShadowKVCache.memory_report``)."""
from __future__ import annotations

import math

import torch

from shadowkv_fx import dense_fallback
from shadowkv_fx.layer_state import LayerState
from shadowkv_fx.prompt_layout import PromptLayout


def _size(t: torch.Tensor | None) -> int:
    """Bytes of ``t``'s elements; a view repeating them (a zero stride: one document's store read by
    the rows of its questions, cache_share.repeat_rows) holds them once."""
    return 0 if t is None else math.prod(n for n, step in zip(t.shape, t.stride()) if step) * t.element_size()


def layer_bytes(state: LayerState) -> dict[str, tuple[str, int]]:
    """Bytes per component of one layer as ``name -> (device type, bytes)``: the model's device
    (``"cuda"``, or ``"cpu"`` for a CPU model) for the state, ``"cpu"`` for values offloaded to
    host memory."""
    k_buf, v_buf = state.k_buf, state.v_buf
    per_token = k_buf.shape[0] * k_buf.shape[1] * (k_buf.shape[3] * k_buf.element_size()
                                                   + v_buf.shape[3] * v_buf.element_size())
    device = k_buf.device.type
    parts: dict[str, tuple[str, int]] = {}
    if state.compressed:
        parts["U"] = (device, _size(state.u))
        parts["SV"] = (device, _size(state.sv))
        # int8 + scales at 8 bits, or key codes + their scales (key_code_bits)
        parts["landmarks"] = (device, _size(state.landmarks) + _size(state.landmark_scale) + _size(state.code_scale))
        parts["outliers"] = (device, state.sel_start * per_token)
        parts["selected"] = (device, (state.local_start - state.sel_start) * per_token)
        if state.v_chunks.device == k_buf.device and k_buf.device.type != "cpu":
            parts["device_V"] = (device, _size(state.v_chunks))  # spare accelerator memory
        else:
            parts["offloaded_V"] = (state.v_chunks.device.type, _size(state.v_chunks))
        if state.v_scale is not None:  # 8-bit values: their scales stay on the device
            parts["value_scales"] = (device, _size(state.v_scale))
    if state.reuse:
        parts["reuse_workspace"] = (device, _size(state.prev_idx))
    parts["local"] = (device, (state.tail_start - state.local_start) * per_token + _size(state.key_valid))
    parts["tail"] = (device, (k_buf.shape[2] - state.tail_start) * per_token)
    if state.folds:
        parts["fold_state"] = (device, _size(state.pre_k) + _size(state.outlier_ids) + _size(state.outlier_cos)
                               + _size(state.tail_first) + _size(state.gen_count))
    return parts


def cache_report(states: list[LayerState], layout: PromptLayout | None, rope_table_bytes: int,
                 uncompressed: dict[str, int], tokens: int | None = None) -> dict[str, dict[str, int]]:
    """``ShadowKVCache.memory_report`` of a cache whose layers hold ``states`` for prompts laid
    out as ``layout`` (None: nothing prefilled), with RoPE tables of ``rope_table_bytes``; the
    dense cache beside it holds ``tokens`` (default: the prompts and every row's generated ones).

    A layer holding a prompt dense that ``layout`` compresses (``dense_layers``, ``dense_fallback_error``,
    ``dense_fallback_recall``) reports its local region (the whole prompts, and the other rows' local
    windows beside them) as ``dense_fallback``; ``uncompressed["dense_fallback_layers"]`` counts such layers."""
    report: dict[str, dict[str, int]] = {"dense": {"kv": 0}}
    device = None
    fallen = set(dense_fallback.fallen_back(states, layout))
    for i, state in enumerate(states):
        if layout is None or state.tail_k is None:
            continue
        device = state.k_buf.device.type
        parts = layer_bytes(state)
        if i in fallen:  # the local region holds whole prompts there: what the dense fallback costs
            parts["dense_fallback"] = parts.pop("local")
        for name, (side, nbytes) in parts.items():
            part = report.setdefault(side, {})
            part[name] = part.get(name, 0) + nbytes
        b, hkv, _, d = state.local_k.shape
        dense = sum(layout.lengths) + b * state.tail_len if tokens is None else tokens
        report["dense"]["kv"] += 2 * dense * hkv * d * state.local_k.element_size()
    if device is not None:
        report[device]["rope_tables"] = rope_table_bytes
    report["uncompressed"] = {**uncompressed, "dense_fallback_layers": len(fallen)} if fallen else uncompressed
    return report


def device_and_host_bytes(report: dict[str, dict[str, int]]) -> tuple[int, int]:
    """``(bytes kept on the model's device, bytes of values offloaded to host memory)`` of a
    ``memory_report()``: on a GPU the state's GPU and host cost; on a CPU model what a GPU would
    hold, although both are then the same RAM."""
    parts = [part for side, part in report.items() if side not in ("dense", "uncompressed")]
    offloaded = sum(part.get("offloaded_V", 0) for part in parts)
    return sum(sum(part.values()) for part in parts) - offloaded, offloaded
