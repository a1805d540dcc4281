"""A prompt prefilled alone joins one slot of a running cache (``slot_cache.SlotCache``), in place.

The running cache's ``LayerState`` is sized once for all its slots (``LayerState.allocate_slots``,
capacities from ``slot_sizes``). ``adopt_row`` copies a batch-1 state's row into one slot's part
of every tensor, sets the rest of that row to what a free row holds, and commits the host counts
through ``LayerState.commit_adoption``: no tensor moves, so a captured decode step replays on
across admissions. Like ``fold.py`` this module writes the state's tensors in place only.
"""
from __future__ import annotations

from shadowkv_fx import fold
from shadowkv_fx.config import ShadowKVConfig
from shadowkv_fx.layer_state import LayerState
from shadowkv_fx.value_store import SlotSizes

# tail slots of a running cache whose rows do not fold, before it first grows (doubling)
UNFOLDED_TAIL = 64


def slot_sizes(config: ShadowKVConfig, max_length: int, tail_capacity: int | None = None) -> SlotSizes:
    """Per-row capacities for slots that hold at most ``max_length`` positions (a prompt of at most
    ``max_length - 1`` tokens, then generated ones).

    - local window: a compressed prompt keeps ``local_chunks`` chunks plus its remainder dense, a
      prompt too short to compress all of itself: ``min_sparse_prompt - 1`` tokens cover both;
    - store: every chunk such a prompt compresses, and with folding every chunk of ``max_length``;
    - tail (``tail_capacity``, default): what a folding row ever holds dense (``fold_window``),
      else ``UNFOLDED_TAIL``. Rows that never fold (prompts too short to compress) need up to
      ``max_length`` slots; the tail doubles when they do (``SlotCache.begin_step``).
    """
    longest, chunk = max_length - 1, config.chunk_size
    compressible = longest >= config.min_sparse_prompt
    if not compressible:
        store = 0
    elif config.folds:
        store = -(-max_length // chunk)
    else:
        store = longest // chunk - config.local_chunks
    if tail_capacity is None:
        tail_capacity = config.fold_window + 1 if compressible and config.folds else UNFOLDED_TAIL
    return SlotSizes(local=min(longest, config.min_sparse_prompt - 1), store=store,
                     tail=max(1, min(tail_capacity, max_length)))


def adopt_row(state: LayerState, b: int, other: LayerState) -> bool:
    """Row ``b`` of the running ``state`` takes ``other``'s one prompt: its outliers, local window,
    compressed store, values and RoPE inputs; its tail ends at the current fill, so the tail slots
    before it, other rows' tokens, stay masked for it (``tail_first``). True when the running cache
    must drop its captured steps (``LayerState.commit_adoption``, or a tail that had to move).

    ``other`` may hold tokens past its prompt: a question asked of a stored document
    (``serving.prefix_store``), decoded in its tail as generated tokens, perhaps partly folded. Row
    ``b`` takes its dense tail slots into its own rows of the tail buffers, ending at the fill, and
    counts them as generated (``tail_origin[b] = tail_len - other.tail_len``), so it positions and
    folds them as ``other`` alone would. Where the fill is lower than that tail, every row's tail
    moves up first (``fold.open_tail``).
    """
    n, chunks = other.lengths[0], other.chunks[0]
    local = other.tail_start - other.local_start
    store = 0 if state.selectable is None else state.selectable.shape[2]
    if local > state.tail_start - state.local_start or chunks > store:
        raise ValueError(f"a prompt of {n} tokens (local window {local}, {chunks} chunks, {other.tail_len} past it) "
                         "does not fit a slot sized for this running cache")
    first, held = other.tail_first_host[0], other.tail_len - other.tail_shift  # its dense tail: slots [first, held)
    moved = fold.open_tail(state, held - first)
    state.key_valid[b] = False
    outliers = other.sel_start
    for dst, src in ((state.k_buf, other.k_buf), (state.v_buf, other.v_buf), (state.key_valid, other.key_valid)):
        dst[b, :, :outliers] = src[0, :, :outliers]
        dst[b, :, state.local_start : state.local_start + local] = src[0, :, other.local_start : other.tail_start]
    if other.folds:
        state.pre_k[b, :, :local] = other.pre_k[0, :, :local]
    if state.compressed:
        _adopt_store(state, b, other, chunks)
    fill = state.tail_len - state.tail_shift
    start = fill - (held - first)  # the row's first tail slot
    _adopt_tail(state, b, other, first, held, start)
    positions = n + other.tail_len
    state.row_columns[b] = positions - state.tail_len  # + gen_count (= tail_len) at each step: the row's position
    state.tail_first[b] = start
    if state.writes_tables:  # RoPE inputs by position (no padding here or there); a question's if it folds
        columns = positions if other.folds else n
        for table, own in zip(state.rope_tables, other.rope_tables):
            table[b, :, :columns] = own[0, :, :columns]
    return state.commit_adoption(b, other, start) or moved


def _adopt_tail(state: LayerState, b: int, other: LayerState, first: int, held: int, start: int) -> None:
    """Row ``b``'s tail slots from ``start`` take ``other``'s dense tail slots ``[first, held)``
    (keys, values, and pre-RoPE keys where it folds)."""
    count = held - first
    if not count:
        return
    for mine, theirs in ((state.k_buf, other.k_buf), (state.v_buf, other.v_buf)):
        mine[b, :, state.tail_start + start : state.tail_start + start + count] = \
            theirs[0, :, other.tail_start + first : other.tail_start + held]
    if other.folds:
        mine_at, theirs_at = state.tail_start - state.local_start + start, other.tail_start - other.local_start + first
        state.pre_k[b, :, mine_at : mine_at + count] = other.pre_k[0, :, theirs_at : theirs_at + count]


def _adopt_store(state: LayerState, b: int, other: LayerState, chunks: int) -> None:
    """The compressed store of row ``b``: ``other``'s ``chunks`` chunks, or nothing selectable."""
    state.selectable[b] = False
    state.outlier_valid[b] = chunks > 0
    if state.reuse:
        state.prev_idx[b] = -1  # the selected region holds another request's chunks: fetch all
    if not chunks:
        state.outlier_ids[b], state.outlier_cos[b], state.fit_err[b] = 0, float("inf"), 0
        return
    tokens = chunks * state.config.chunk_size
    other.bases.finish()  # its key bases (key_basis.py), should its prefill not have ended in end_step
    if other.values_copied is not None:  # prefill's copy to the host may still be landing
        other.values_copied.synchronize()
    state.u[b, :tokens] = other.u[0, :tokens]
    state.sv[b] = other.sv[0]
    state.landmarks[b, :, :chunks] = other.landmarks[0, :, :chunks]
    state.selectable[b, :, :chunks] = other.selectable[0, :, :chunks]
    state.v_chunks[b, :, :chunks] = other.v_chunks[0, :, :chunks]
    for mine, theirs in ((state.v_scale, other.v_scale), (state.landmark_scale, other.landmark_scale)):
        if mine is not None:  # 8-bit values or landmarks
            mine[b, :, :chunks] = theirs[0, :, :chunks]
    if state.code_scale is not None:  # key codes
        state.code_scale[b] = other.code_scale[0]
    state.outlier_ids[b], state.outlier_cos[b], state.fit_err[b] = (
        other.outlier_ids[0], other.outlier_cos[0], other.fit_err[0])
