"""Fold a sequence's oldest dense tokens into its compressed store (issue #15).

ShadowKV compresses the prompt; without folding every later token (generated, or a later chat turn)
stays dense for good. Between decode steps (``ShadowKVCache.begin_step``, never inside a captured
step) a row whose dense tokens past its store reach ``local_chunks + fold_chunks`` whole chunks
folds its oldest whole chunks, keeping ``local_chunks`` chunks (+ the remainder) dense:

- keys: the pre-RoPE keys are projected onto the row's low-rank basis (new ``U`` rows); when their
  relative projection error exceeds ``fold_refresh`` x the basis's own fit error, the basis is
  refreshed instead by an incremental SVD (``refresh_basis``);
- landmarks and min-cosines of the new chunks from their exact post-RoPE keys (as at prefill);
- outliers: each KV head keeps as outliers the ``outlier_chunks`` chunks with the lowest min-cosine
  among all its chunks so far (what prefill would pick over the whole sequence): a new chunk that
  ranks among them takes the slot of the one it displaces, which becomes selectable;
- values go to the value store (pinned host memory or device slots).

Chunk ``c`` of a row always covers positions ``[c*L, (c+1)*L)``: folds take the row's oldest dense
tokens (first the prompt's local window, then generated ones), so the rebuild's position rule
(padded column ``pad + c*L + i``) holds, reading RoPE inputs that decode steps store after the
prompt's columns. The tail is then compacted: slots every row has folded are dropped, so the dense
tail stays within the fold window while the store grows by ``U`` rows and landmarks only.
Buffers keep their addresses (the store is preallocated), so a captured decode step stays valid:
this module writes the ``LayerState``'s tensors in place only, and sets its host counts through its
methods (``commit_fold``, ``drop_tail_slots``, ``restore_fold_counts``); ``open_tail`` undoes a compaction.
"""
from __future__ import annotations

import torch

from shadowkv_fx.kernels import compression, key_codes
from shadowkv_fx.layer_state import LayerState
from shadowkv_fx.value_store import write_chunks

# below this relative error a projection is exact to float32 rounding: never refresh for noise
REFRESH_FLOOR = 1e-5


def project_keys(sv: torch.Tensor, k_pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares ``U`` rows of new keys on an existing basis, and their relative error; any
    leading dims (rows of a batch) are batched over.

    Args:
        sv: ``[..., Hkv, r, D]`` (``diag(s) V^T`` per head slice); k_pre: ``[..., Hkv, n, D]``.
    Returns:
        ``U_new [..., n, r]`` float32 with ``U_new @ SV[h] ~= k_pre[h]``, and ``|K - U_new SV| / |K|``
        (``[...]``, on the keys' device).
    """
    w = _flat(sv)
    k = _flat(k_pre)
    u = k @ orthogonal_pinv(w)
    err = (k - u @ w).flatten(-2).norm(dim=-1) / k.flatten(-2).norm(dim=-1).clamp_min(1e-30)
    return u, err


def orthogonal_pinv(w: torch.Tensor) -> torch.Tensor:
    """Pseudo-inverse ``[..., HD, r]`` of bases ``w [..., r, HD]`` whose rows are orthogonal, as
    every basis here is (``diag(s) V^T`` of an SVD, at prefill and at each refresh):
    ``W^T diag(1 / |w_i|^2)``, zero rows (rank above the keys' own) mapping to zero. Elementwise,
    where ``torch.linalg.pinv`` would run an SVD per row and layer with a host sync each."""
    norms = w.square().sum(dim=-1)
    inverse = torch.where(norms > 0, 1 / norms.clamp_min(1e-30), torch.zeros_like(norms))
    return w.transpose(-1, -2) * inverse[..., None, :]


def refresh_basis(sv: torch.Tensor, k_pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Incremental SVD: the rank-``r`` basis of the old keys' factorisation plus the new keys.

    With ``K_old ~= U SV``, ``[U 0; 0 I] @ [SV; K_new] = [K_old; K_new]``; the SVD of the small
    stacked matrix ``M = [SV; K_new] = P diag(s) Q^T`` gives the new ``SV' = diag(s_r) Q_r^T``,
    the old rows' rotation ``P[:r, :r]`` (``U' = U @ P[:r, :r]``) and the new rows ``P[r:, :r]``.
    Exact when nothing is truncated (full rank).

    Returns:
        ``rotation [r, r]``, ``U_new [n, r]``, ``SV' [Hkv, r, D]`` (all float32) and the relative
        truncation error of ``M`` (the new basis's fit error).
    """
    hkv, r, d = sv.shape
    stacked = torch.cat([_flat(sv), _flat(k_pre)])
    p, s, qh = torch.linalg.svd(stacked, full_matrices=False)
    kept = min(r, s.numel())
    rotation = stacked.new_zeros(r, r)
    rotation[:, :kept] = p[:r, :kept]
    u_new = stacked.new_zeros(k_pre.shape[1], r)
    u_new[:, :kept] = p[r:, :kept]
    sv_new = stacked.new_zeros(r, hkv * d)
    sv_new[:kept] = s[:kept, None] * qh[:kept]
    energy = s.square()
    fit = float((energy[kept:].sum() / energy.sum().clamp_min(1e-30)).sqrt())
    return rotation, u_new, sv_new.view(r, hkv, d).permute(1, 0, 2).contiguous(), fit


def _flat(k: torch.Tensor) -> torch.Tensor:
    """``[..., Hkv, n, D]`` -> ``[..., n, Hkv*D]`` float32 (one row per token, all heads: one shared basis)."""
    return k.transpose(-3, -2).flatten(-2).float()


def chunks_due(state: LayerState, generated: int | None = None, chunks: list[int] | None = None) -> list[int]:
    """Whole chunks each row folds before its ``generated``-th generated token (default: the next
    one) from a store of ``chunks`` chunks per row (default: what it holds); 0 for rows never
    compressed, which stay dense."""
    cfg = state.config
    chunk = cfg.chunk_size
    generated = state.tail_len if generated is None else generated
    due = []
    for n, first, c, origin in zip(state.lengths, state.prompt_chunks, state.chunks if chunks is None else chunks,
                                   state.tail_origin):
        dense = n + generated - origin - c * chunk  # a slot's row generated since it joined (tail_origin)
        foldable = first and dense >= (cfg.local_chunks + cfg.fold_chunks) * chunk
        due.append(dense // chunk - cfg.local_chunks if foldable else 0)
    return due


def next_fold_point(state: LayerState, tokens: int) -> int | None:
    """The first of the next ``tokens`` tokens (by offset, from 1) before which one-token-at-a-time
    decoding would fold, or None. Offset 0 is the fold the step starts with (``begin_step``)."""
    if not state.folds:
        return None
    chunks = [c + m for c, m in zip(state.chunks, chunks_due(state))]
    for offset in range(1, tokens):
        if any(chunks_due(state, state.tail_len + offset, chunks)):
            return offset
    return None


def folded_past(state: LayerState, kept: int, chunks: list[int] | None = None) -> int | None:
    """Tokens past the prompt some row has folded (with ``chunks`` per row, default what it
    holds), if more than ``kept`` (so they cannot be dropped)."""
    if not state.folds:
        return None
    chunk = state.config.chunk_size
    furthest = max(c * chunk - n + origin for c, n, origin in zip(state.chunks if chunks is None else chunks,
                                                                 state.lengths, state.tail_origin))
    return furthest if furthest > kept else None


def fold(state: LayerState, undo: list | None = None) -> bool:
    """Fold what is due in one layer and compact its tail; True when anything was folded.
    With ``undo`` (a list), a ``FoldUndo`` that can take the fold back is appended to it.

    Rows whose fold reads and writes the same places (same length, store size and count, tails
    from the same slot: every row of an equal-length batch) fold together, in one set of batched ops: a fold costs a few
    dozen kernel launches and one host sync per layer, not per row."""
    if not state.folds:
        return False
    due = chunks_due(state)
    if not any(due):
        return False
    record = FoldUndo(state) if undo is not None else None
    groups: dict[tuple[int, ...], list[int]] = {}
    for b, m in enumerate(due):
        if m:
            key = (m, state.lengths[b], state.prompt_chunks[b], state.chunks[b], state.tail_origin[b])
            groups.setdefault(key, []).append(b)
    for (m, *_), rows in groups.items():
        _fold_rows(state, rows, m, record)
    _compact_tail(state, record)
    state.tail_first.copy_(torch.tensor(state.tail_first_host))
    if record is not None:
        undo.append(record)
    return True


def _slot_ranges(state: LayerState, b: int, first: int, count: int) -> list[tuple[int, int]]:
    """Buffer slots of row ``b``'s dense positions ``[first, first + count)``, as at most two
    ranges ``[start, stop)``: the prompt's local window, then the generated tail."""
    n, local_first = state.lengths[b], state.prompt_chunks[b] * state.config.chunk_size
    stop = first + count
    ranges = []
    if first < n:
        ranges.append((state.local_start + first - local_first, state.local_start + min(stop, n) - local_first))
    if stop > n:  # generated token g of the row sits at tail slot tail_origin + g, less the compacted slots
        tail_first = state.tail_start - n + state.tail_origin[b] - state.tail_shift
        ranges.append((tail_first + max(first, n), tail_first + stop))
    return ranges


def _row_index(rows: list[int]) -> slice | list[int]:
    """Rows as a slice where they are consecutive (a view: no copy, no host-to-device index)."""
    return slice(rows[0], rows[-1] + 1) if rows == list(range(rows[0], rows[-1] + 1)) else rows


def _fold_rows(state: LayerState, rows: list[int], m: int, undo: "FoldUndo | None") -> None:
    """Fold the ``m`` oldest dense chunks of ``rows``, which share their slots and store size."""
    cfg = state.config
    chunk = cfg.chunk_size
    c0 = state.chunks[rows[0]]
    t0, count = c0 * chunk, m * chunk
    ranges = _slot_ranges(state, rows[0], t0, count)
    device = state.k_buf.device
    slots = torch.cat([torch.arange(a, z, device=device) for a, z in ranges])
    r = _row_index(rows)
    k_rot, v = state.k_buf[:, :, slots][r], state.v_buf[:, :, slots][r]  # [R, Hkv, count, D]
    k_pre = state.pre_k[:, :, slots - state.local_start][r]
    n_rows, hkv, _, dv = v.shape

    u_new, err = project_keys(state.sv[r], k_pre)
    # the one host sync of the fold: whether a row's basis must be refreshed
    err, fit_err = torch.stack([err.float(), state.fit_err[r].float()]).tolist()
    state.u[r, t0 : t0 + count] = u_new.to(state.u.dtype)
    refreshes = 0
    for i, b in enumerate(rows):
        if err[i] > max(cfg.fold_refresh * fit_err[i], REFRESH_FLOOR):
            if undo is not None:
                undo.save_basis(b, t0)
            rotation, u_row, sv_new, state.fit_err[b] = refresh_basis(state.sv[b], k_pre[i])
            state.u[b, :t0] = (state.u[b, :t0].float() @ rotation).to(state.u.dtype)
            state.sv[b] = sv_new.to(state.sv.dtype)
            state.u[b, t0 : t0 + count] = u_row.to(state.u.dtype)
            refreshes += 1

    landmarks, min_cos = compression.chunk_landmarks(k_rot.reshape(n_rows * hkv, count, -1), chunk, cfg.landmark_runs)
    if cfg.key_code_bits:  # the new keys' codes under the row's prompt scales (clamped), as at prefill
        landmarks = key_codes.encode(k_rot, state.code_scale[r], chunk)
    folded = (r, slice(None), slice(c0, c0 + m))  # quantised at 8 bits, as at prefill
    write_chunks(state.landmarks, state.landmark_scale, folded, landmarks.view(n_rows, hkv, m, -1))
    write_chunks(state.v_chunks, state.v_scale, folded, v.reshape(n_rows, hkv, m, chunk, dv))
    state.selectable[r, :, c0 : c0 + m] = True
    if cfg.outlier_chunks:
        if undo is not None:
            for b in rows:
                undo.save_outliers(b)
        ids = torch.arange(c0, c0 + m, device=device)
        _update_outliers(state, r, k_rot, v, min_cos.view(n_rows, hkv, m), ids, c0 + m)

    if state.reuse:
        # last step's picks may name chunks that were empty or outliers then and hold real values now
        state.prev_idx[r] = -1
    for a, z in ranges:
        if a < state.tail_start:
            state.key_valid[r, :, a:z] = False
    state.commit_fold(rows, c0 + m, t0 + count, refreshes)


def _update_outliers(state: LayerState, r: slice | list[int], k_rot: torch.Tensor, v: torch.Tensor,
                     min_cos: torch.Tensor, ids: torch.Tensor, chunks: int) -> None:
    """Keep per row and KV head the ``outlier_chunks`` lowest-min-cosine chunks among the old
    outliers and the new chunks ``ids`` (rows ``r``: ``k_rot``/``v`` ``[R, Hkv, m*L, D]``,
    ``min_cos [R, Hkv, m]``); the dense outlier region of the buffer is rewritten to hold them."""
    o, chunk = state.config.outlier_chunks, state.config.chunk_size
    n_rows, hkv, _, d = k_rot.shape
    dv, m = v.shape[-1], ids.numel()
    width = o * chunk
    cand_k = torch.cat([state.k_buf[:, :, :width][r].reshape(n_rows, hkv, o, chunk, d),
                        k_rot.to(state.k_buf.dtype).reshape(n_rows, hkv, m, chunk, d)], dim=2)
    cand_v = torch.cat([state.v_buf[:, :, :width][r].reshape(n_rows, hkv, o, chunk, dv),
                        v.to(state.v_buf.dtype).reshape(n_rows, hkv, m, chunk, dv)], dim=2)
    cand_cos = torch.cat([state.outlier_cos[r], min_cos.float()], dim=2)
    cand_ids = torch.cat([state.outlier_ids[r], ids.expand(n_rows, hkv, m)], dim=2)
    keep = torch.topk(-cand_cos, o, dim=2).indices
    state.k_buf[r, :, :width] = cand_k.gather(2, keep[..., None, None].expand(-1, -1, -1, chunk, d)).flatten(2, 3)
    state.v_buf[r, :, :width] = cand_v.gather(2, keep[..., None, None].expand(-1, -1, -1, chunk, dv)).flatten(2, 3)
    state.outlier_cos[r] = cand_cos.gather(2, keep)
    outliers = cand_ids.gather(2, keep)
    state.outlier_ids[r] = outliers
    selectable = state.selectable[r]
    selectable[:, :, :chunks] = True
    selectable.scatter_(2, outliers, False)
    state.selectable[r] = selectable


def compact(state: LayerState) -> None:
    """Drop the leading tail slots no row reads any more, also where nothing folded (the rows of a
    running cache join and leave at any step: ``slot_cache.SlotCache``)."""
    shift = state.tail_shift
    _compact_tail(state)
    if state.tail_shift != shift:
        state.tail_first.copy_(torch.tensor(state.tail_first_host))


def _tail_buffers(state: LayerState) -> list[tuple[torch.Tensor, int]]:
    """The buffers holding the dense tail, each with the index of its first tail slot."""
    start = state.tail_start
    buffers = [(state.k_buf, start), (state.v_buf, start), (state.pre_k, start - state.local_start)]
    return [(buf, first) for buf, first in buffers if buf is not None]  # no pre_k: a running cache that never folds


def _compact_tail(state: LayerState, undo: "FoldUndo | None" = None) -> None:
    """Drop the leading tail slots every row has folded: shift the rest down, in place (the caller
    copies ``tail_first_host`` to the device)."""
    fill = state.tail_len - state.tail_shift
    shift = min(min(state.tail_first_host), fill)
    if shift <= 0:
        return
    if undo is not None:
        undo.save_tail(fill, shift)
    for buf, first in _tail_buffers(state):
        buf[:, :, first : first + fill - shift] = buf[:, :, first + shift : first + fill].clone()
    state.drop_tail_slots(shift)


def open_tail(state: LayerState, tokens: int) -> bool:
    """Compaction undone: where fewer than ``tokens`` tail slots are filled, move every row's tail
    up so that ``tokens`` are (``slot_state.adopt_row``: a row joins with a question in its tail,
    and a row's tokens end at the one shared fill). True when a buffer had to grow
    (``LayerState.reserve_tail``: the cache drops its captured steps); else all moves in place."""
    fill = state.tail_len - state.tail_shift
    up = tokens - fill
    if up <= 0:
        return False
    grew = state.reserve_tail(up + 1)  # and the next step's token: one move, not two
    for buf, first in _tail_buffers(state):
        buf[:, :, first + up : first + up + fill] = buf[:, :, first : first + fill].clone()
    state.drop_tail_slots(-up)
    state.tail_first.copy_(torch.tensor(state.tail_first_host))
    return grew


class FoldUndo:
    """One layer's fold, as it can be taken back.

    A decode step of several tokens runs in pieces split at its fold points, so its later drafts
    see the folded state; when speculation then rejects the draft a fold point came before, the
    crop must also leave the state as one-token-at-a-time decoding has it there, unfolded. The
    host counts are kept here, and the tensors a fold overwrites in place (rotated ``U`` rows and
    ``SV`` on a basis refresh, the dense outliers, the tail slots compaction drops) are copied
    just before they change. What a fold appends past a row's chunks (``U`` rows, landmarks,
    values) is left: nothing reads past ``chunks[b]``, and the next fold overwrites it.
    """

    def __init__(self, state: LayerState) -> None:
        self.state = state
        self.chunks = list(state.chunks)
        self.tail_first = list(state.tail_first_host)
        self.fit_err = state.fit_err.clone()
        self.refreshes, self.tail_shift = state.refreshes, state.tail_shift
        self.local_valid = state.key_valid[:, :, state.local_start : state.tail_start].clone()
        self.bases: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.outliers: dict[int, tuple[torch.Tensor, ...]] = {}
        self.dropped: tuple[int, list[torch.Tensor]] | None = None

    def save_basis(self, b: int, t0: int) -> None:
        self.bases[b] = (self.state.u[b, :t0].clone(), self.state.sv[b].clone())

    def save_outliers(self, b: int) -> None:
        s, width = self.state, self.state.config.outlier_chunks * self.state.config.chunk_size
        self.outliers[b] = (s.outlier_ids[b].clone(), s.outlier_cos[b].clone(), s.k_buf[b, :, :width].clone(),
                            s.v_buf[b, :, :width].clone())

    def save_tail(self, fill: int, shift: int) -> None:
        self.dropped = (fill, [buf[:, :, first : first + shift].clone() for buf, first in _tail_buffers(self.state)])

    def restore(self) -> None:
        """The layer as it was before the fold; the crop that calls this rewinds the fill levels."""
        s = self.state
        if self.dropped is not None:
            fill, dropped = self.dropped
            shift = dropped[0].shape[2]
            for (buf, first), old in zip(_tail_buffers(s), dropped):
                buf[:, :, first + shift : first + fill] = buf[:, :, first : first + fill - shift].clone()
                buf[:, :, first : first + shift] = old
        for b, (u, sv) in self.bases.items():
            s.u[b, : u.shape[0]] = u
            s.sv[b] = sv
        width = s.config.outlier_chunks * s.config.chunk_size
        for b, (ids, cos, k, v) in self.outliers.items():
            s.outlier_ids[b], s.outlier_cos[b] = ids, cos
            s.k_buf[b, :, :width], s.v_buf[b, :, :width] = k, v
        for b, (before, now) in enumerate(zip(self.chunks, s.chunks)):
            if before != now:
                s.selectable[b] = False
                s.selectable[b, :, :before] = True
                s.selectable[b].scatter_(1, s.outlier_ids[b], False)
        s.restore_fold_counts(self.chunks, self.tail_first, self.fit_err, self.refreshes, self.tail_shift)
        s.key_valid[:, :, s.local_start : s.tail_start] = self.local_valid
        s.tail_first.copy_(torch.tensor(s.tail_first_host))
