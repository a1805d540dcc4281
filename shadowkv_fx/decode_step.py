"""One layer's decode step over its ``LayerState``: append the new tokens to the tail, select each
KV head's chunks, rebuild their keys and fetch their values into the buffer, attend.

Every write here is in place, at the device-side fill level, with fixed shapes and no host sync,
so the whole step can be captured as a CUDA graph and replayed (``cuda_graph.py``); which fields
that holds by address is listed on ``LayerState``.
"""
from __future__ import annotations

from typing import Callable

import torch

from shadowkv_fx.config import ShadowKVConfig
from shadowkv_fx.kernels import dispatch, naive, value_reuse
from shadowkv_fx.layer_state import LayerState

RopeFn = Callable[..., torch.Tensor]
# bytes of rebuilt keys, values and logits ``attend_earlier`` holds at once (a group of tokens)
_GROUP_BYTES = 256 * 2**20


def decode(state: LayerState, q: torch.Tensor, k_pre_new: torch.Tensor, v_new: torch.Tensor,
           rope_inputs: list[torch.Tensor], rope_fn: RopeFn, scale: float) -> torch.Tensor:
    """Attend ``q [B, Hq, n, D]`` over outliers + selected chunks + local window + generated tail.

    With several new tokens (speculative verification) each selects its own chunks, as it
    would decoding one at a time, so speculation never changes the output.
    """
    append_tail(state, k_pre_new, v_new, rope_inputs, rope_fn)
    n = q.shape[2]
    if n > 1 and state.compressed:
        # the newest token goes through the buffer, which keeps its picks for the next step
        earlier = attend_earlier(state, q[:, :, :-1], rope_fn, scale)
        return torch.cat([earlier, _attend(state, q[:, :, -1:], rope_fn, scale, 0)], dim=2)
    return _attend(state, q, rope_fn, scale, 0)


def attend_earlier(state: LayerState, q: torch.Tensor, rope_fn: RopeFn, scale: float) -> torch.Tensor:
    """Attention of ``q [B, Hq, m, D]``, the ``m`` tail tokens before the newest, each over the
    chunks it selects itself and the tail up to its own slot: what ``_attend`` gives each of them
    one at a time, computed for many at once.

    One at a time was a score, a top-k, a rebuild, a gather and an attention per token and layer:
    a 56-token question asked of a stored 122K document took 1.6 s of the serving loop on the H100
    (``workload_reuse``), every running row waiting. Here a row's tokens become the rows of a batch
    that scores and rebuilds from the row's store through zero-stride views (as
    ``cache_share.repeat_rows`` does) into keys and values of their own; they attend those and the
    row's buffer (outliers, local window, tail), one softmax over both. The state is not written.
    Tokens go ``_GROUP_BYTES`` of rebuilt keys and values at a time.
    """
    b_size, hq, m, d = q.shape
    hkv, keys, dv = state.v_buf.shape[1], state.k_buf.shape[2], state.v_buf.shape[3]
    group_heads, chunk = hq // hkv, state.config.chunk_size
    selected = state.select_k * chunk
    region = slice(state.sel_start, state.local_start)
    per_token = hkv * selected * (d + dv) * state.k_buf.element_size() + 4 * hq * (keys + selected)
    group = max(1, min(m, _GROUP_BYTES // per_token))
    out = q.new_empty(b_size, hq, m, dv)
    for b in range(b_size):
        # the buffer's keys each of the m + 1 new tokens may see, as one step of them all would mask
        # them; the selected region holds the newest token's picks, none of the earlier tokens'
        buffer_ok = state.key_valid[b : b + 1].clone()
        buffer_ok[..., region] = False
        tail_first = None if state.tail_first is None else state.tail_first[b : b + 1]
        seen = naive.decode_mask(buffer_ok, keys, state.tail_start, state.tail_fill, m + 1, tail_first)[0]
        for first in range(0, m, group):
            rows = min(group, m - first)

            def each(t: torch.Tensor | None) -> torch.Tensor | None:
                return None if t is None else t[b : b + 1].expand(rows, *t.shape[1:])

            q_rows = q[b, :, first : first + rows].transpose(0, 1).unsqueeze(2).contiguous()  # [rows, Hq, 1, D]
            selectable = each(state.selectable)
            scores = chunk_scores(q_rows, each(state.landmarks), selectable, scale, each(state.landmark_scale),
                                  state.config, each(state.code_scale))
            chunk_idx, picked = dispatch.top_chunks(scores, state.select_k)
            k_sel = state.k_buf.new_empty(rows, hkv, selected, d)
            v_sel = state.v_buf.new_empty(rows, hkv, selected, dv)
            tables = [t if t.shape[0] == 1 else t[b : b + 1] for t in state.rope_tables]
            dispatch.rebuild_rope_keys(each(state.u), each(state.sv), chunk_idx, chunk, each(state.pad), tables,
                                       state.rope_form, rope_fn, k_sel)
            dispatch.gather_value_chunks(each(state.v_chunks), chunk_idx, q.device, v_sel, None, each(state.v_scale))
            allowed = torch.cat([seen[:, first : first + rows].transpose(0, 1), picked.repeat_interleave(chunk, dim=-1)],
                                dim=-1)  # [rows, Hkv, keys + selected]
            # [rows, Hkv, G, D]: the G query heads of each KV head
            q_grouped = q_rows.view(rows, hkv, group_heads, d)
            on_buffer = torch.matmul(q_grouped.transpose(0, 1).reshape(hkv, rows * group_heads, d),
                                     state.k_buf[b].transpose(1, 2)).view(hkv, rows, group_heads, keys).transpose(0, 1)
            on_selected = torch.matmul(q_grouped, k_sel.transpose(2, 3))
            logits = torch.cat([on_buffer, on_selected], dim=-1).float() * scale
            weights = logits.masked_fill(~allowed[:, :, None], float("-inf")).softmax(-1).to(state.v_buf.dtype)
            from_buffer = torch.matmul(weights[..., :keys].transpose(0, 1).reshape(hkv, rows * group_heads, keys),
                                       state.v_buf[b]).view(hkv, rows, group_heads, dv).transpose(0, 1)
            attended = from_buffer + torch.matmul(weights[..., keys:], v_sel)  # [rows, Hkv, G, Dv]
            out[b, :, first : first + rows] = attended.reshape(rows, hq, dv).transpose(0, 1)
    return out


def _attend(state: LayerState, q: torch.Tensor, rope_fn: RopeFn, scale: float, newer: int) -> torch.Tensor:
    """``q``'s rows are the tail tokens just before the ``newer`` newest ones."""
    if state.compressed:
        fill_selected(state, *select(state, q, scale), rope_fn)
    fill = state.tail_fill - newer if newer else state.tail_fill
    return dispatch.decode_attention(q, state.k_buf, state.v_buf, state.key_valid, state.tail_start, fill, scale,
                                     state.tail_first)


def append_tail(state: LayerState, k_pre: torch.Tensor, v: torch.Tensor, rope_inputs: list[torch.Tensor],
                rope_fn: RopeFn) -> None:
    """Rotate new tokens' keys and write them at the device-side fill level (a replayed step
    reads the current one): one fused kernel where prefill found it rotates exactly as
    ``rope_fn`` does, else ``rope_fn`` and a write per buffer.

    A folding layer also keeps their pre-RoPE keys and writes their RoPE inputs (``[B|1, 1, n, c]``
    each) into the tables' columns after the prompt, where a folded chunk's rebuild reads them
    (the first layer sharing a table writes it for all).
    """
    n = k_pre.shape[2]
    # a device arange is a launch: made only where a write reads it, never on the fused path
    # of a layer that leaves the tables to another
    offsets = None if state.fused_append and not (state.folds and state.writes_tables) \
        else torch.arange(n, device=state.tail_fill.device)
    if state.fused_append:
        dispatch.append_rope(k_pre, v, rope_inputs, state.rope_form, state.k_buf, state.v_buf, state.tail_fill,
                             state.tail_start, state.pre_k, state.tail_start - state.local_start)
    else:
        slots = state.tail_start + state.tail_fill + offsets
        state.k_buf.index_copy_(2, slots, rope_fn(k_pre, *rope_inputs).to(state.k_buf.dtype))
        state.v_buf.index_copy_(2, slots, v.to(state.v_buf.dtype))
        if state.folds:
            state.pre_k.index_copy_(2, slots - state.local_start, k_pre.to(state.pre_k.dtype))
    if state.folds:
        if state.writes_tables and state.row_columns is None:
            columns = state.padded_len + state.gen_count + offsets
            for table, new in zip(state.rope_tables, rope_inputs):
                # a one-row table serves sequences whose positions agree (rope_tables.SharedRopeTables)
                new = new[: table.shape[0]].to(table.dtype)
                table.index_copy_(2, columns, new.expand(table.shape[0], 1, n, table.shape[3]))
        elif state.writes_tables:
            _write_row_columns(state, rope_inputs, offsets)
        state.gen_count.add_(n)
    state.tail_fill.add_(n)


def _write_row_columns(state: LayerState, rope_inputs: list[torch.Tensor], offsets: torch.Tensor) -> None:
    """The RoPE inputs of a running cache's new tokens (``[B|1, 1, n, c]`` each), each row at its
    own columns (its positions: slots join at any step). A free row's columns run on past the
    table: they are clamped to its last column, which a row writes again before it reads it."""
    table = state.rope_tables[0]
    columns = (state.row_columns[:, None] + state.gen_count + offsets).clamp(max=table.shape[2] - 1)  # [B, n]
    rows = torch.arange(table.shape[0], device=columns.device)[:, None]
    for table, new in zip(state.rope_tables, rope_inputs):
        table[rows, 0, columns] = new[:, 0].to(table.dtype)


def select(state: LayerState, q: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k chunks per KV head: ``chunk_idx [B, Hkv, k]`` and whether each pick is real."""
    scores = chunk_scores(q, state.landmarks, state.selectable, scale, state.landmark_scale, state.config,
                          state.code_scale)
    return dispatch.top_chunks(scores, state.select_k)


def chunk_scores(q: torch.Tensor, landmarks: torch.Tensor, selectable: torch.Tensor, scale: float,
                 landmark_scale: torch.Tensor | None, config: ShadowKVConfig,
                 code_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, Hkv, C]`` scores the top-k ranks chunks by: ``dispatch.score_chunks`` over the landmarks,
    with ``config.landmark_runs`` landmarks a chunk (``landmarks [B, Hkv, C, runs*D]``) scored as
    landmarks of their own and summed per chunk (after the max over a group's query heads, an upper
    bound of the group's best head), or with ``config.key_code_bits`` the attention mass of the
    chunks' per-key codes (the landmark rows, under ``code_scale``: ``dispatch.score_code_chunks``);
    then widened over spans (``span_neighbors``)."""
    runs = config.landmark_runs
    if config.key_code_bits:
        scores = dispatch.score_code_chunks(q, landmarks, code_scale, selectable, scale)
    elif runs == 1:
        scores = dispatch.score_chunks(q, landmarks, selectable, scale, landmark_scale)
    else:
        b, hkv, c, width = landmarks.shape

        def per_run(t: torch.Tensor) -> torch.Tensor:  # a chunk's flag or scale, once for each of its runs
            return t[..., None].expand(b, hkv, c, runs).reshape(b, hkv, c * runs)

        scores = dispatch.score_chunks(q, landmarks.reshape(b, hkv, c * runs, width // runs), per_run(selectable),
                                       scale, None if landmark_scale is None else per_run(landmark_scale))
        scores = scores.view(b, hkv, c, runs).sum(-1)  # -inf where the chunk is not selectable
    if config.span_neighbors:
        scores = widen_spans(scores, selectable, config.span_neighbors)
    return scores


# A lifted neighbour ranks just below the chunk that lifts it, nearer ones first, so a budget that
# runs out inside a span keeps its peak; 2**-20 is a few float32 ulps, too small to pass another chunk.
_LIFT_STEP = 2.0**-20


def widen_spans(scores: torch.Tensor, selectable: torch.Tensor, neighbors: int) -> torch.Tensor:
    """Each selectable chunk's score raised to its selectable neighbours' best within ``neighbors``
    chunks (a max-pool along the prompt), so the top-k takes a strong chunk's neighbours with it:
    a span cut by a chunk boundary, half of it in a chunk whose landmark scores low, stays whole.

    Fixed shapes and pointwise ops only (capturable in a CUDA graph). A masked chunk stays ``-inf``
    and lifts nothing: an outlier is attended densely anyway, padding is no text.

    Args:
        scores: ``[B, Hkv, C]`` float32, ``-inf`` where not selectable.
        selectable: ``[B, Hkv, C]`` bool.
        neighbors: chunks on each side, >= 1.
    Returns:
        ``[B, Hkv, C]`` float32.
    """
    c = scores.shape[-1]
    padded = torch.nn.functional.pad(scores, (neighbors, neighbors), value=float("-inf"))
    best = scores
    for d in range(1, neighbors + 1):
        near = torch.maximum(padded[..., neighbors - d : neighbors - d + c], padded[..., neighbors + d : neighbors + d + c])
        best = torch.maximum(best, near - near.abs() * (d * _LIFT_STEP))
    return best.masked_fill(~selectable, float("-inf"))


def fill_selected(state: LayerState, chunk_idx: torch.Tensor, picked: torch.Tensor, rope_fn: RopeFn) -> None:
    """Rebuild the chosen chunks' keys (low rank, then RoPE at their positions) and fetch their
    values, straight into the buffer's selected region; mark which picks are real.

    With value reuse a chunk chosen again stays in its slot (``value_reuse.stable_slots``): its
    values are already there, only new chunks' values cross PCIe, and nothing is copied aside.
    """
    chunk = state.config.chunk_size
    region = slice(state.sel_start, state.local_start)
    fetch = None
    if state.reuse:
        chunk_idx, picked, fetch = value_reuse.stable_slots(chunk_idx, picked, state.prev_idx)
        state.prev_idx.copy_(chunk_idx)
        state.v_lookups[0] += fetch.numel() - fetch.sum()
        state.v_lookups[1] += fetch.numel()
    dispatch.rebuild_rope_keys(state.u, state.sv, chunk_idx, chunk, state.pad, state.rope_tables, state.rope_form,
                               rope_fn, state.k_buf[:, :, region])
    dispatch.gather_value_chunks(state.v_chunks, chunk_idx, state.v_buf.device, state.v_buf[:, :, region], fetch,
                                 state.v_scale)
    # one broadcast copy (repeat_interleave would launch an index build and a gather)
    state.key_valid[:, :, region].unflatten(-1, (-1, chunk)).copy_(picked[..., None].expand(*picked.shape, chunk))
