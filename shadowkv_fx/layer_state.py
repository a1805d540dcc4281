"""One attention layer's compressed cache: built at prefill, read at every decode step.

``LayerState`` owns every field of it; no other module rebinds one. Its collaborators take it as a typed
argument, read it and write only its tensors in place: ``decode_step.py`` (a step), ``fold.py`` (folding),
``slot_state.py`` (a prompt joining a running cache's slot), ``memory_report.py``; ``cache_share.py`` and
``cache_io.py`` hand a copy's or a load's fields to ``adopt``. Host counts change through its methods.
"""
from __future__ import annotations

from typing import Callable

import torch

from shadowkv_fx import dense_fallback, host_copies, key_basis, rope_detection
from shadowkv_fx.config import ShadowKVConfig
from shadowkv_fx.kernels import dispatch
from shadowkv_fx.pinned import grown, moved
from shadowkv_fx.prompt_layout import PromptLayout, store_chunks, tail_slots
from shadowkv_fx.rope_tables import reserve_columns
from shadowkv_fx.value_store import SlotSizes, chunk_slots, landmark_slots, write_chunks, write_landmarks


class LayerState:
    """Compressed K/V of one layer for a batch: low-rank keys, landmarks, outliers, local window,
    offloaded values, and a dense tail of generated tokens that only grows.

    A decode step reads and writes only device tensors at fixed addresses, with fixed shapes and no host sync, so it
    can be captured as a CUDA graph and replayed: the tail is preallocated (``reserve_tail``, outside the step) and
    its fill level lives on the device (``tail_fill``). ``tail_len`` is the host's copy of that count, advanced by the
    cache once a step completes.

    Held by address by a captured step, so written in place only (by the step; between steps by ``fold.py`` and
    ``slot_state.py``): ``k_buf``, ``v_buf``, ``key_valid``, ``pre_k``, ``tail_fill``, ``tail_first``, ``gen_count``,
    ``u``, ``sv``, ``landmarks``, ``selectable``, ``v_chunks``, ``pad``, the scales, ``prev_idx``, ``v_lookups``,
    ``row_columns`` and the tensors of ``rope_tables``; baked into it: ``sel_start``, ``local_start``, ``tail_start``,
    ``select_k``, ``padded_len``, ``rope_form`` and the flags. After prefill only ``reserve_tail``,
    ``commit_adoption`` (and ``adopt``, on a new copy) rebind any, between steps, and then return True so the cache
    drops its graphs (``decode_graphs.clear()``): ``_relayout`` (buffers, offsets, ``select_k``, ``prev_idx``),
    ``_grow_store`` (the store), ``rope_tables.reserve_columns`` (the shared tables, which
    ``SharedRopeTables.widen_for`` also swaps), the RoPE form a slot's first compressed prompt names. No step reads
    the host counts (``tail_len``, ``chunks``, ``tail_first_host``, ``tail_shift``, ``refreshes``) or ``fit_err``.
    """

    def __init__(self, config: ShadowKVConfig) -> None:
        self.config = config
        # rows whose prompts are not compressed yet; None before the first prefill group and after the last
        self._pending: set[int] | None = None

        # The prompts (copied from the batch's PromptLayout at prefill)
        self.lengths: list[int] = []  # [B] real prompt tokens per row
        self.padded_len = 0  # columns of the padded prompt: generated tokens' RoPE inputs follow
        self.prompt_chunks: list[int] = []  # [B] chunks compressed at prefill (0: the row decodes densely)
        self.chunks: list[int] = []  # [B] chunks in the store now: the prompt's, then folded ones
        self.pad: torch.Tensor | None = None  # [B] long, leading pad tokens per row (device)
        self.compressed = False  # any row compressed: decode selects and rebuilds chunks
        self.folds = False  # generated tokens fold into the store (config.folds, on a compressed batch)
        self.reuse = False  # value reuse: a chunk chosen again keeps its slot (values off the device)
        self.select_k = 0  # C_sel, chunks each step selects per KV head (config.select_chunks of the store)

        # RoPE of the site: what rebuilt and appended keys are rotated with
        self.rope_tables: list[torch.Tensor] = []  # each [B|1, 1, S, c], shared by layers (SharedRopeTables)
        self.rope_form: str | None = None  # the known form that reproduces the model's RoPE (rope_forms.py), or None
        self.rope_pending: rope_detection.PendingForm | None = None  # prefill's checks, until rope_detection.settle
        self.fused_append = False  # new tokens rotated by one kernel (dispatch.append_rope), exactly the model's RoPE
        self.writes_tables = True  # of the layers sharing one set of tables, the first writes the new tokens' columns

        # The compressed store (C chunks of L tokens per row; grows with folds: _grow_store)
        self.u: torch.Tensor | None = None  # [B, C*L, r] low-rank key factors, one row per token
        self.sv: torch.Tensor | None = None  # [B, Hkv, r, D] diag(s) V^T per row: keys = U @ SV[h]
        self.landmarks: torch.Tensor | None = None  # [B, Hkv, C, runs*D] post-RoPE chunk or run means (or int8)
        self.landmark_scale: torch.Tensor | None = None  # [B, Hkv, C] float32 scales of int8 landmarks (or None)
        self.code_scale: torch.Tensor | None = None  # [B, Hkv, 2, D] float32: landmarks are key codes (key_code_bits)
        self.selectable: torch.Tensor | None = None  # [B, Hkv, C] bool: a chunk a step may pick (not an outlier)
        # [B, Hkv, C, L, Dv] values of every chunk (or int8), pinned host memory or spare device memory
        self.v_chunks: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None  # [B, Hkv, C] float32 (device) scales of int8 values (or None)
        self.values_copied: torch.cuda.Event | None = None  # the last prefill copy to the host, still landing
        self.outlier_ids: torch.Tensor | None = None  # [B, Hkv, O] long, the chunks kept dense as outliers
        self.outlier_cos: torch.Tensor | None = None  # [B, Hkv, O] float32, their min-cosines (fold ranks new chunks)
        self.outlier_valid: torch.Tensor | None = None  # [B] bool: the row has outliers (it is compressed)
        self.fit_err: torch.Tensor | None = None  # [B] float32, what the rank-r basis misses of the keys
        self.refreshes, self.bases = 0, key_basis.PendingBases()  # bases refreshed by folds; prefill's, in flight

        # Prefill only, dropped once the decode buffers are built (T: the longest local window)
        self._local_k: torch.Tensor | None = None  # [B, Hkv, T, D] post-RoPE keys of the local window
        self._local_v: torch.Tensor | None = None  # [B, Hkv, T, Dv]
        self._local_kpre: torch.Tensor | None = None  # [B, Hkv, T, D] pre-RoPE (folding only)
        self._local_valid: torch.Tensor | None = None  # [B, T] bool: the row's window reaches that slot
        self._outlier_k: torch.Tensor | None = None  # [B, Hkv, O*L, D] post-RoPE keys of the outlier chunks
        self._outlier_v: torch.Tensor | None = None  # [B, Hkv, O*L, Dv]

        # Decode buffers: [outliers | selected chunks | local window | generated tail] along N
        self.k_buf: torch.Tensor | None = None  # [B, Hkv, N, D] post-RoPE keys
        self.v_buf: torch.Tensor | None = None  # [B, Hkv, N, Dv]
        self.key_valid: torch.Tensor | None = None  # [B, Hkv, tail_start] bool; the tail's validity is its fill
        self.sel_start = 0  # first slot of the selected region (= O*L)
        self.local_start = 0  # first slot of the local window (= sel_start + select_k*L)
        self.tail_start = 0  # first slot of the generated tail
        self.gen_capacity = 0  # generated tokens the store and tables are sized for (folding)
        self.tail_len = 0  # generated tokens committed (host); the tail holds tail_len - tail_shift
        self.tail_fill: torch.Tensor | None = None  # 0-d long, tail slots written (device: a replay reads it)
        self.prev_idx: torch.Tensor | None = None  # [B, Hkv, select_k] long, the chunk each selected slot holds (reuse)
        self.v_lookups: torch.Tensor | None = None  # [2] long, value chunks served from the device, chunks asked for

        # Folding (fold.py)
        self.tail_shift = 0  # tail slots compacted away so far
        self.tail_first_host: list[int] = []  # [B] the row's first tail slot still dense (host mirror)
        self.tail_first: torch.Tensor | None = None  # [B] long, the same on the device (attention skips below it)
        self.gen_count: torch.Tensor | None = None  # 0-d long, generated tokens whose RoPE inputs are stored
        # [B, Hkv, T + tail slots, D] pre-RoPE keys of every dense token, slot for slot from local_start
        self.pre_k: torch.Tensor | None = None

        # Slots of a running cache (allocate_slots): rows adopt prompts prefilled alone, at any step
        self.tail_origin: list[int] = []  # [B] tail_len at the row's prompt's end (0: prefilled together)
        # [B] long, slots: the RoPE-table column of the row's next token, less gen_count
        self.row_columns: torch.Tensor | None = None

    # Attention reads the decode buffers in place; no concatenation per step. Outliers and local are written at
    # prefill, the selected chunks by each step's rebuild and fetch, the tail as tokens come.
    @property
    def tail_k(self) -> torch.Tensor | None:
        return None if self.k_buf is None else self.k_buf[:, :, self.tail_start :]

    @property
    def tail_v(self) -> torch.Tensor | None:
        return None if self.v_buf is None else self.v_buf[:, :, self.tail_start :]

    @property
    def local_k(self) -> torch.Tensor:
        return self.k_buf[:, :, self.local_start : self.tail_start]

    def add_rows(self, rows: list[int], k_pre: torch.Tensor, k_rot: torch.Tensor, v: torch.Tensor, group: PromptLayout,
                 layout: PromptLayout, rope_tables: list[torch.Tensor], writes_tables: bool, tail_capacity: int,
                 keep_values_on_device: Callable[[int], bool] = lambda nbytes: False) -> None:
        """Compress the prompts of batch rows ``rows`` into their slots.

        ``k_pre, k_rot, v: [len(rows), Hkv, S_g, D]`` in the group's own left-padded layout (``group``);
        ``layout`` is the whole batch's. Prefill may run the batch a group of rows at a time (one group's
        dense K/V on the device): slots are allocated as the first group arrives, buffers built after the last.
        ``rope_tables``: the batch's per-position tables ``[B or 1, 1, S, c]`` (filled by the cache);
        ``writes_tables``: this layer is the first of those reading them. A row whose slot was sized for chunks
        that ``layout`` now leaves uncompressed, or whose keys fail ``dense_fallback_error``, is kept dense.
        """
        self.writes_tables = writes_tables
        if self._pending is None:
            self._allocate(layout, k_pre, k_rot, v, rope_tables, keep_values_on_device, tail_capacity)
        cfg, chunk = self.config, self.config.chunk_size
        for i, b in enumerate(rows):
            n_chunks, (kp, kr, vb) = layout.chunks[b], (x[i, :, group.pad[i] :] for x in (k_pre, k_rot, v))
            t = n_chunks * chunk
            c = dense_fallback.compressed(cfg, kp, kr, vb, t) if n_chunks else None
            if self.prompt_chunks[b] and c is None:  # kept dense (dense_fallback.py): the whole prompt, local
                n_chunks = t = self.prompt_chunks[b] = self.chunks[b] = 0
                self._local_k, self._local_v, self._local_kpre, self._local_valid = dense_fallback.widened_local(
                    self, b, kr.shape[1])
            local = kr.shape[1] - t
            self._local_k[b, :, :local], self._local_v[b, :, :local] = kr[:, t:], vb[:, t:]
            if self.folds:
                self._local_kpre[b, :, :local] = kp[:, t:]
            if n_chunks:
                self.selectable[b, :, :n_chunks] = True
                self.selectable[b].scatter_(1, c.outliers, False)
                self.outlier_ids[b], self.outlier_cos[b] = c.outliers, c.outlier_cos
                self._outlier_k[b], self._outlier_v[b] = c.outlier_k, c.outlier_v
                stored = (b, slice(None), slice(0, n_chunks))
                self.bases.store(c, kp[:, :t], cfg.rank, self.u[b, :t], self.sv[b], self.fit_err[b])
                write_landmarks(self.landmarks, self.landmark_scale, self.code_scale, stored, c)  # int8, or key codes
                values = vb[:, :t].reshape(-1, n_chunks, chunk, vb.shape[-1])
                self.values_copied = write_chunks(self.v_chunks, self.v_scale, stored, values, side_stream=True)
                if self.rope_form is None and self.rope_pending is None:  # settled after the prefill's last layer
                    tables = [tb[min(b, tb.shape[0] - 1)][None, :, layout.pad[b] :] for tb in rope_tables]
                    self.rope_pending = rope_detection.measure(kp[None], kr[None], tables)
            self._pending.discard(b)
        if not self._pending:
            self._build_buffers(tail_capacity)

    def _allocate(self, layout: PromptLayout, k_pre, k_rot, v, rope_tables, keep_values_on_device,
                  tail_capacity: int) -> None:
        """Zeroed slots for every row of the batch: padding stays zero (never read: masked)."""
        chunk, device = self.config.chunk_size, k_pre.device
        local_lens = [n - c * chunk for n, c in zip(layout.lengths, layout.chunks)]
        self._pending = set(range(len(layout.lengths)))
        self.lengths, self.padded_len = list(layout.lengths), layout.padded_len
        self.prompt_chunks, self.chunks = list(layout.chunks), list(layout.chunks)
        self.pad = host_copies.small_to_device(layout.pad, device)
        self.outlier_valid = host_copies.small_to_device([c > 0 for c in layout.chunks], device)
        # a folding store holds every chunk a row may fold: its prompt and ``tail_capacity`` generated tokens
        folds = layout.max_chunks and self.config.folds
        store = store_chunks(self.lengths, tail_capacity, chunk) if folds else layout.max_chunks
        self._allocate_rows(k_pre, k_rot, v, max(local_lens), store, rope_tables, keep_values_on_device)
        lens = host_copies.small_to_device(local_lens, device)
        self._local_valid = torch.arange(max(local_lens), device=device) < lens[:, None]

    def _allocate_rows(self, k_pre, k_rot, v, local_max: int, store: int, rope_tables, keep_values_on_device) -> None:
        """Zeroed tensors for ``len(self.lengths)`` rows: local windows of ``local_max`` tokens and
        compressed stores of ``store`` chunks (0: no row is compressed)."""
        cfg, chunk, device = self.config, self.config.chunk_size, k_pre.device
        b_size, (hkv, d), dv = len(self.lengths), k_pre.shape[1::2], v.shape[-1]
        self.rope_tables, self.rope_form, self.fused_append, self.rope_pending = rope_tables, None, False, None
        self._local_k = k_rot.new_zeros(b_size, hkv, local_max, d)
        self._local_v = v.new_zeros(b_size, hkv, local_max, dv)
        self.compressed = store > 0
        self.select_k, self._outlier_k, self._outlier_v = 0, None, None
        self.folds = self.compressed and cfg.folds
        self.tail_first_host, self.tail_origin = [0] * b_size, [0] * b_size
        if self.folds:
            self._local_kpre = k_pre.new_zeros(b_size, hkv, local_max, d)
        if not self.compressed:
            return
        self.select_k = cfg.select_chunks(store)  # again when the store grows (_grow_store)
        outlier_tokens = cfg.outlier_chunks * chunk
        self.u, self.sv = k_pre.new_zeros(b_size, store * chunk, cfg.rank), k_pre.new_zeros(b_size, hkv, cfg.rank, d)
        self.landmarks, self.landmark_scale, self.code_scale = landmark_slots(cfg, (b_size, hkv, store), d, k_rot)
        self.selectable = torch.zeros(b_size, hkv, store, dtype=torch.bool, device=device)
        self._outlier_k, self._outlier_v = (x.new_zeros(b_size, hkv, outlier_tokens, x.shape[-1]) for x in (k_rot, v))
        self.v_chunks, self.v_scale = chunk_slots((b_size, hkv, store, chunk, dv), v, cfg.value_bits,
                                                  keep_values_on_device)
        self.outlier_ids = torch.zeros(b_size, hkv, cfg.outlier_chunks, dtype=torch.long, device=device)
        self.outlier_cos = torch.full((b_size, hkv, cfg.outlier_chunks), float("inf"), device=device)
        self.fit_err, self.refreshes = torch.zeros(b_size, device=device), 0
        # values not in accelerator memory: a chunk chosen again keeps its slot, only new ones are fetched
        self.reuse = cfg.reuse_values and self.v_chunks.device.type != "cuda"
        if self.reuse:
            self.prev_idx = torch.full((b_size, hkv, self.select_k), -1, dtype=torch.long, device=device)
            self.v_lookups = torch.zeros(2, dtype=torch.long, device=device)

    def allocate_slots(self, like: LayerState, rows: int, sizes: SlotSizes, rope_tables: list[torch.Tensor],
                       writes_tables: bool, keep_values_on_device: Callable[[int], bool]) -> None:
        """Empty state for the ``rows`` slots of a running cache (``slot_cache.SlotCache``), sized
        once (``sizes``) for every prompt and generation its ``max_length`` admits: a prompt
        prefilled alone joins a free row in place (``slot_state.adopt_row``), so admissions never
        reallocate and a captured decode step stays valid. ``like``: one such prompt's state (dtypes,
        devices, heads). Rows start free; no padding: a row's RoPE tables are indexed by position."""
        self.lengths, self.padded_len, self.prompt_chunks, self.chunks = [0] * rows, 0, [0] * rows, [0] * rows
        self.writes_tables = writes_tables
        self._allocate_rows(like.k_buf, like.k_buf, like.v_buf, sizes.local, sizes.store, rope_tables,
                            keep_values_on_device)
        self.rope_form, self.fused_append = like.rope_form, like.fused_append
        self.pad = torch.zeros(rows, dtype=torch.long, device=like.k_buf.device)
        self.row_columns = torch.zeros_like(self.pad)
        self.outlier_valid = torch.zeros_like(self.pad, dtype=torch.bool)
        self._local_valid = torch.zeros(rows, sizes.local, dtype=torch.bool, device=self.pad.device)
        self._build_buffers(sizes.tail)

    def _build_buffers(self, tail_capacity: int) -> None:
        self.gen_capacity = tail_capacity
        if self.folds:
            tail_capacity = tail_slots(self.config, self.prompt_chunks, tail_capacity)
        b, hkv, local_len, d = self._local_k.shape
        outliers = 0 if self._outlier_k is None else self._outlier_k.shape[2]
        self.sel_start = outliers
        self.local_start = outliers + self.select_k * self.config.chunk_size
        self.tail_start = self.local_start + local_len
        # zeros, not empty: unwritten slots are masked, but NaN garbage would survive a 0 weight
        self.k_buf = self._local_k.new_zeros(b, hkv, self.tail_start + tail_capacity, d)
        self.v_buf = self._local_v.new_zeros(b, hkv, self.tail_start + tail_capacity, self._local_v.shape[-1])
        self.key_valid = torch.zeros(b, hkv, self.tail_start, dtype=torch.bool, device=self.k_buf.device)
        if outliers:
            self.k_buf[:, :, :outliers] = self._outlier_k
            self.v_buf[:, :, :outliers] = self._outlier_v
            self.key_valid[:, :, :outliers] = self.outlier_valid[:, None, None]
        self.k_buf[:, :, self.local_start : self.tail_start] = self._local_k
        self.v_buf[:, :, self.local_start : self.tail_start] = self._local_v
        self.key_valid[:, :, self.local_start : self.tail_start] = self._local_valid[:, None, :]
        if self.folds:
            self.pre_k = self._local_kpre.new_zeros(b, hkv, local_len + tail_capacity, d)
            self.pre_k[:, :, :local_len] = self._local_kpre
            self.gen_count = torch.zeros((), dtype=torch.long, device=self.k_buf.device)
            self._local_kpre = None
        if self.folds or self.row_columns is not None:  # slots: each row's tail starts where it joined
            self.tail_first = torch.zeros(b, dtype=torch.long, device=self.k_buf.device)
        self._local_k = self._local_v = self._outlier_k = self._outlier_v = self._pending = None
        self.tail_len, self.tail_fill = 0, torch.zeros((), dtype=torch.long, device=self.k_buf.device)

    def values_ready(self) -> None:
        """Later work on the current stream sees what prefill wrote off it: values copied to the host, key bases."""
        self.bases.finish()
        host_copies.wait(self.values_copied)  # None: none in flight
        if self.values_copied is not None and not dispatch.triton_available():  # the fallback gather reads on the CPU
            self.values_copied.synchronize()
        self.values_copied = None

    def reserve_tail(self, tokens: int) -> bool:
        """Make room for ``tokens`` more generated tokens; True when any buffer had to move.

        Runs before a step, never inside one: a captured step would keep writing to the old buffers.
        Capacities double, so no generated token is ever dropped. A folding layer also needs room
        for the tokens' RoPE inputs and for the chunks they will fold into.
        """
        moved = False
        if self.folds and self.row_columns is None:  # slots are sized for their max_length once
            needed = self.tail_len + tokens
            if needed > self.gen_capacity:
                self.gen_capacity = max(2 * self.gen_capacity, needed)
                self._grow_store(store_chunks(self.lengths, self.gen_capacity, self.config.chunk_size))
                moved = True
            moved |= reserve_columns(self.rope_tables, self.padded_len + self.gen_capacity)
        needed = self.tail_len - self.tail_shift + tokens
        capacity = self.k_buf.shape[2] - self.tail_start
        if needed <= capacity:
            return moved
        self._relayout(self.select_k, max(2 * capacity, needed))
        return True

    def _relayout(self, select_k: int, tail_capacity: int) -> None:
        """New decode buffers with a ``select_k``-chunk selected region and room for ``tail_capacity``
        tail tokens; outliers, local window and tail are carried over, the selected region is
        refilled by the next step."""
        local_len = self.tail_start - self.local_start
        local_start = self.sel_start + select_k * self.config.chunk_size
        tail_start = local_start + local_len
        used = self.tail_len - self.tail_shift
        # the selected region survives only where it keeps its width (value reuse: prev_idx names its slots)
        kept = self.local_start if select_k == self.select_k else self.sel_start
        dense = dict(kept=kept, start=self.local_start, to=local_start)
        self.key_valid = moved(self.key_valid, tail_start, count=local_len, **dense)
        self.k_buf = moved(self.k_buf, tail_start + tail_capacity, count=local_len + used, **dense)
        self.v_buf = moved(self.v_buf, tail_start + tail_capacity, count=local_len + used, **dense)
        if self.pre_k is not None:
            self.pre_k = moved(self.pre_k, local_len + tail_capacity, kept=0, start=0, to=0, count=local_len + used)
        self.local_start, self.tail_start = local_start, tail_start
        if select_k != self.select_k:
            self.select_k = select_k
            if self.reuse:
                b, hkv = self.key_valid.shape[:2]
                self.prev_idx = self.prev_idx.new_full((b, hkv, select_k), -1)

    def _grow_store(self, chunks: int) -> None:
        """Reallocate the compressed store for ``chunks`` chunks per row (contents kept); a larger
        store may raise the top-k size, which widens the decode buffers' selected region."""
        self.u = grown(self.u, 1, chunks * self.config.chunk_size)
        self.landmarks, self.landmark_scale = (grown(t, 2, chunks) for t in (self.landmarks, self.landmark_scale))
        self.v_chunks, self.v_scale = (grown(t, 2, chunks) for t in (self.v_chunks, self.v_scale))
        self.selectable = grown(self.selectable, 2, chunks)
        select_k = self.config.select_chunks(chunks)
        if select_k != self.select_k:
            self._relayout(select_k, self.k_buf.shape[2] - self.tail_start)

    def take_rope_form(self, form: str, fused_append: bool) -> None:  # rope_detection.settle's reading of the checks
        self.rope_form, self.fused_append, self.rope_pending = form, fused_append, None

    def adopt(self, fields: dict) -> None:  # a copy's or a load's fields: only ones __init__ declared
        if unknown := fields.keys() - vars(self).keys():
            raise AttributeError(f"LayerState declares no field {sorted(unknown)}")
        self.__dict__.update(fields)

    def advance(self, tokens: int) -> None:
        """Commit a decode step's ``tokens`` new tokens (the device fill level already counts them)."""
        self.tail_len += tokens

    def rewind_tail(self) -> None:
        """Forget tokens a failed step appended: the device counts go back to the host's."""
        if self.tail_fill is not None:
            self.tail_fill.fill_(self.tail_len - self.tail_shift)
        if self.gen_count is not None:
            self.gen_count.fill_(self.tail_len)
        if self.reuse:
            self.prev_idx.fill_(-1)  # the selected region may be half-written: fetch it all next step

    def crop_tail(self, kept: int) -> None:
        """Keep the first ``kept`` generated tokens (the cache checked none later is folded)."""
        self.tail_len = kept
        self.rewind_tail()

    # The host counts of folding (fold.py moves the tensors in place, then commits the counts here)
    def commit_fold(self, rows: list[int], chunks: int, folded: int, refreshes: int) -> None:
        """``rows`` now hold ``chunks`` chunks: their first ``folded`` tokens; ``refreshes`` refreshed a basis."""
        for b in rows:
            self.chunks[b] = chunks
            self.tail_first_host[b] = max(0, self.tail_origin[b] + max(0, folded - self.lengths[b]) - self.tail_shift)
        self.refreshes += refreshes

    # The host counts of slots (slot_state.adopt_row writes the tensors in place, then commits here)
    def commit_adoption(self, b: int, other: LayerState, first: int) -> bool:
        """Row ``b`` holds ``other``'s one prompt now, its tail's tokens (as generated) from slot ``first``.
        True when a captured step must be dropped: the first compressed prompt names the RoPE form."""
        self.lengths[b], self.prompt_chunks[b], self.chunks[b] = other.lengths[0], other.prompt_chunks[0], other.chunks[0]
        self.tail_origin[b], self.tail_first_host[b] = self.tail_len - other.tail_len, first
        if other.rope_form is None or (self.rope_form, self.fused_append) == (other.rope_form, other.fused_append):
            return False
        self.rope_form, self.fused_append = other.rope_form, other.fused_append
        return True

    def park_rows(self, rows: list[int]) -> None:
        """Slots ``rows`` hold no request: never folding, their tail at the fill (never holding compaction back)."""
        for b in rows:
            self.prompt_chunks[b], self.tail_first_host[b] = 0, self.tail_len - self.tail_shift

    def drop_tail_slots(self, shift: int) -> None:
        """The ``shift`` leading tail slots are compacted away, or ``-shift`` opened (their contents already moved)."""
        fill = self.tail_len - self.tail_shift
        self.tail_first_host = [f - shift for f in self.tail_first_host]
        self.tail_shift += shift
        self.tail_fill.fill_(fill - shift)

    def restore_fold_counts(self, chunks: list[int], tail_first_host: list[int], fit_err: torch.Tensor,
                            refreshes: int, tail_shift: int) -> None:
        """The host counts and ``fit_err`` as ``fold.FoldUndo`` saved them before a fold."""
        self.chunks, self.tail_first_host, self.fit_err = chunks, tail_first_host, fit_err
        self.refreshes, self.tail_shift = refreshes, tail_shift
