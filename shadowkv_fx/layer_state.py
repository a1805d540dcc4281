"""One attention layer's compressed cache: built at prefill, read at every decode step."""
from __future__ import annotations

import math
from typing import Callable

import torch

from shadowkv_fx import fold, host_copies
from shadowkv_fx.config import ShadowKVConfig
from shadowkv_fx.kernels import dispatch, reference as ref
from shadowkv_fx.kernels.rope_forms import detect_rope_form
from shadowkv_fx.pinned import pinned_zeros
from shadowkv_fx.preflight import check_host_memory
from shadowkv_fx.prompt_layout import PromptLayout

RopeFn = Callable[..., torch.Tensor]


def _value_slots(shape: tuple[int, ...], like: torch.Tensor, keep_on_device: Callable[[int], bool]) -> torch.Tensor:
    """Zeroed slots for the chunked values: in spare accelerator memory when ``keep_on_device``
    grants the bytes, else in pinned host memory (plain memory on a CPU model)."""
    nbytes = math.prod(shape) * like.element_size()
    if like.device.type == "cpu" or keep_on_device(nbytes):
        return like.new_zeros(shape)
    check_host_memory(nbytes)
    return pinned_zeros(shape, like.dtype)


class LayerState:
    """Compressed K/V of one layer for a batch: low-rank keys, landmarks, outliers, local window,
    offloaded values, and a dense tail of generated tokens that only grows.

    A decode step reads and writes only device tensors at fixed addresses, with fixed shapes and
    no host sync, so it can be captured as a CUDA graph and replayed: the tail is preallocated
    (``reserve_tail``, outside the step) and its fill level lives on the device (``tail_fill``).
    ``tail_len`` is the host's copy of that count, advanced by the cache once a step completes.
    """

    def __init__(self, config: ShadowKVConfig) -> None:
        self.config = config
        self.k_buf: torch.Tensor | None = None
        self.v_buf: torch.Tensor | None = None
        self._pending: set[int] | None = None
        self.tail_len = 0
        self.tail_fill: torch.Tensor | None = None
        # folding (fold.py): tail slots compacted away so far, and per row the first tail slot
        # still dense (host mirror of ``tail_first``); generated tokens whose RoPE inputs are stored
        self.folds = False
        self.tail_shift = 0
        self.tail_first_host: list[int] = []
        self.tail_first: torch.Tensor | None = None
        self.gen_count: torch.Tensor | None = None
        self.pre_k: torch.Tensor | None = None
        # new tokens rotated and written by one kernel (``dispatch.append_rope``): prefill sets it
        # where that kernel reproduces the model's key RoPE exactly
        self.fused_append = False
        # of the layers sharing one set of RoPE tables, the first writes the new tokens' columns
        self.writes_tables = True
        # the last prefill copy of values to the host, still landing on a side stream (host_copies)
        self.values_copied: torch.cuda.Event | None = None

    # Decode reads one persistent buffer per layer, ``[B, Hkv, N, D]`` for K and V, laid out as
    # [outliers | selected chunks | local window | generated tail]: outliers and local are written
    # at prefill, the selected chunks by each step's rebuild and fetch, the tail as tokens come.
    # Attention reads it in place; no concatenation per step.
    @property
    def tail_k(self) -> torch.Tensor | None:
        return None if self.k_buf is None else self.k_buf[:, :, self.tail_start :]

    @property
    def tail_v(self) -> torch.Tensor | None:
        return None if self.v_buf is None else self.v_buf[:, :, self.tail_start :]

    @property
    def local_k(self) -> torch.Tensor:
        return self.k_buf[:, :, self.local_start : self.tail_start]

    def add_rows(
        self,
        rows: list[int],
        k_pre: torch.Tensor,
        k_rot: torch.Tensor,
        v: torch.Tensor,
        group: PromptLayout,
        layout: PromptLayout,
        rope_tables: list[torch.Tensor],
        tail_capacity: int,
        keep_values_on_device: Callable[[int], bool] = lambda nbytes: False,
    ) -> None:
        """Compress the prompts of batch rows ``rows`` into their slots.

        ``k_pre, k_rot, v: [len(rows), Hkv, S_g, D]`` in the group's own left-padded layout
        (``group``); ``layout`` is the whole batch's. Prefill may run the batch a group of rows at
        a time, so only one group's dense K/V is ever on the device; the slots are allocated when
        the first group arrives, the decode buffers built when the last has.
        ``rope_tables``: the batch's per-position tables ``[B or 1, 1, S, c]`` (filled by the cache).
        """
        if self._pending is None:
            self._allocate(layout, k_pre, k_rot, v, rope_tables, keep_values_on_device, tail_capacity)
        cfg = self.config
        chunk = cfg.chunk_size
        d = k_pre.shape[-1]
        for i, b in enumerate(rows):
            start, n_chunks = group.pad[i], layout.chunks[b]
            t = n_chunks * chunk
            kp, kr, vb = (x[i, :, start:] for x in (k_pre, k_rot, v))
            local = kr.shape[1] - t
            self._local_k[b, :, :local] = kr[:, t:]
            self._local_v[b, :, :local] = vb[:, t:]
            if self.folds:
                self._local_kpre[b, :, :local] = kp[:, t:]
            if n_chunks:
                u, sv = ref.low_rank_keys(kp[:, :t], cfg.rank)
                landmarks, min_cos = ref.chunk_landmarks(kr[:, :t], chunk)
                outliers = torch.topk(-min_cos, cfg.outlier_chunks, dim=-1).indices
                self.selectable[b, :, :n_chunks] = True
                self.selectable[b].scatter_(1, outliers, False)
                self.outlier_ids[b] = outliers
                self.outlier_cos[b] = min_cos.gather(1, outliers)
                energy = kp[:, :t].float().square().sum()
                # U's columns are orthonormal, so what SV misses of the keys' energy is the fit error
                self.fit_err[b] = (1 - sv.square().sum() / energy.clamp_min(1e-30)).clamp_min(0).sqrt()
                token_idx = ref.chunk_tokens(outliers, chunk)
                self._outlier_k[b] = torch.gather(kr, 1, token_idx[..., None].expand(-1, -1, d))
                self._outlier_v[b] = torch.gather(vb, 1, token_idx[..., None].expand(-1, -1, d))
                self.u[b, :t] = u
                self.sv[b] = sv
                self.landmarks[b, :, :n_chunks] = landmarks
                self.values_copied = host_copies.copy(self.v_chunks[b, :, :n_chunks],
                                                      vb[:, :t].reshape(-1, n_chunks, chunk, vb.shape[-1]))
                if self.rope_form is None:
                    tables = [tb[min(b, tb.shape[0] - 1)][None, :, layout.pad[b] :] for tb in rope_tables]
                    self.rope_form = detect_rope_form(kp[None], kr[None], tables)
                    self.fused_append = dispatch.rotates_like(kp[None], kr[None], tables, self.rope_form)
            self._pending.discard(b)
        if not self._pending:
            self._build_buffers(tail_capacity)

    def _allocate(self, layout: PromptLayout, k_pre, k_rot, v, rope_tables, keep_values_on_device,
                  tail_capacity: int) -> None:
        """Zeroed slots for every row of the batch: padding stays zero (never read: masked)."""
        cfg = self.config
        chunk = cfg.chunk_size
        b_size, (hkv, d), dv = len(layout.lengths), k_pre.shape[1::2], v.shape[-1]
        device = k_pre.device
        c_max = layout.max_chunks
        self._pending = set(range(b_size))
        self.rope_tables = rope_tables
        self.rope_form = None
        self.fused_append = False
        self.pad = torch.tensor(layout.pad, device=device)
        self.outlier_valid = torch.tensor([c > 0 for c in layout.chunks], device=device)
        local_lens = [n - c * chunk for n, c in zip(layout.lengths, layout.chunks)]
        local_max = max(local_lens)
        self._local_k = k_rot.new_zeros(b_size, hkv, local_max, d)
        self._local_v = v.new_zeros(b_size, hkv, local_max, dv)
        self._local_valid = torch.arange(local_max, device=device) < torch.tensor(local_lens, device=device)[:, None]
        self.compressed = c_max > 0
        self.select_k = 0
        self._outlier_k = self._outlier_v = None
        self.lengths, self.padded_len = list(layout.lengths), layout.padded_len
        self.prompt_chunks, self.chunks = list(layout.chunks), list(layout.chunks)
        self.folds = self.compressed and cfg.folds
        self.tail_first_host = [0] * b_size
        if self.folds:
            self._local_kpre = k_pre.new_zeros(b_size, hkv, local_max, d)
        if not self.compressed:
            return
        # the store holds every chunk a row may fold: its prompt and ``tail_capacity`` generated tokens
        c_max = fold.store_chunks(self.lengths, tail_capacity, chunk) if self.folds else c_max
        self.select_k = cfg.select_chunks(c_max)  # again when the store grows (fold.grow_store)
        outlier_tokens = cfg.outlier_chunks * chunk
        self.u = k_pre.new_zeros(b_size, c_max * chunk, cfg.rank)
        self.sv = k_pre.new_zeros(b_size, hkv, cfg.rank, d)
        self.landmarks = k_rot.new_zeros(b_size, hkv, c_max, d)
        self.selectable = torch.zeros(b_size, hkv, c_max, dtype=torch.bool, device=device)
        self._outlier_k = k_rot.new_zeros(b_size, hkv, outlier_tokens, d)
        self._outlier_v = v.new_zeros(b_size, hkv, outlier_tokens, dv)
        self.v_chunks = _value_slots((b_size, hkv, c_max, chunk, dv), v, keep_values_on_device)
        self.outlier_ids = torch.zeros(b_size, hkv, cfg.outlier_chunks, dtype=torch.long, device=device)
        self.outlier_cos = torch.full((b_size, hkv, cfg.outlier_chunks), float("inf"), device=device)
        self.fit_err = torch.zeros(b_size, device=device)  # per row: what the rank-r basis misses of the keys
        self.refreshes = 0
        # values not in accelerator memory: a chunk chosen again keeps its slot, only new ones are fetched
        self.reuse = cfg.reuse_values and self.v_chunks.device.type != "cuda"
        if self.reuse:
            self.prev_idx = torch.full((b_size, hkv, self.select_k), -1, dtype=torch.long, device=device)
            self.v_lookups = torch.zeros(2, dtype=torch.long, device=device)  # hits, chunks asked for

    def _build_buffers(self, tail_capacity: int) -> None:
        self.gen_capacity = tail_capacity
        if self.folds:
            tail_capacity = fold.tail_slots(self.config, self.prompt_chunks, tail_capacity)
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
            # pre-RoPE keys of every dense token, slot for slot from ``local_start``: folding projects them
            self.pre_k = self._local_kpre.new_zeros(b, hkv, local_len + tail_capacity, d)
            self.pre_k[:, :, :local_len] = self._local_kpre
            self.tail_first = torch.zeros(b, dtype=torch.long, device=self.k_buf.device)
            self.gen_count = torch.zeros((), dtype=torch.long, device=self.k_buf.device)
            self._local_kpre = None
        self._local_k = self._local_v = self._outlier_k = self._outlier_v = self._pending = None
        self.tail_len = 0
        self.tail_fill = torch.zeros((), dtype=torch.long, device=self.k_buf.device)

    def values_ready(self) -> None:
        """Later work on the current stream sees the values prefill copied to the host."""
        if self.values_copied is None:
            return
        host_copies.wait(self.values_copied)
        if not dispatch.triton_available():  # the fallback gather reads them on the CPU
            self.values_copied.synchronize()
        self.values_copied = None

    def reserve_tail(self, tokens: int) -> bool:
        """Make room for ``tokens`` more generated tokens; True when any buffer had to move.

        Runs before a step, never inside one: a captured step would keep writing to the old buffers.
        Capacities double, so no generated token is ever dropped. A folding layer also needs room
        for the tokens' RoPE inputs and for the chunks they will fold into.
        """
        moved = False
        if self.folds:
            needed = self.tail_len + tokens
            if needed > self.gen_capacity:
                self.gen_capacity = max(2 * self.gen_capacity, needed)
                fold.grow_store(self, fold.store_chunks(self.lengths, self.gen_capacity, self.config.chunk_size))
                moved = True
            moved |= fold.reserve_tables(self, self.padded_len + self.gen_capacity)
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
        chunk = self.config.chunk_size
        local_len = self.tail_start - self.local_start
        sel_width = select_k * chunk
        local_start = self.sel_start + sel_width
        tail_start = local_start + local_len
        used = self.tail_len - self.tail_shift
        # the selected region survives only where it keeps its width (value reuse: prev_idx names its slots)
        kept = self.local_start if select_k == self.select_k else self.sel_start
        key_valid = self.key_valid.new_zeros(*self.key_valid.shape[:2], tail_start)
        key_valid[:, :, :kept] = self.key_valid[:, :, :kept]
        key_valid[:, :, local_start:] = self.key_valid[:, :, self.local_start :]
        for name in ("k_buf", "v_buf"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[0], old.shape[1], tail_start + tail_capacity, old.shape[3])
            new[:, :, :kept] = old[:, :, :kept]
            new[:, :, local_start : tail_start + used] = old[:, :, self.local_start : self.tail_start + used]
            setattr(self, name, new)
        if self.pre_k is not None:
            old = self.pre_k
            self.pre_k = old.new_zeros(*old.shape[:2], local_len + tail_capacity, old.shape[3])
            self.pre_k[:, :, : local_len + used] = old[:, :, : local_len + used]
        self.key_valid, self.local_start, self.tail_start = key_valid, local_start, tail_start
        if select_k != self.select_k:
            self.select_k = select_k
            if self.reuse:
                b, hkv = key_valid.shape[:2]
                self.prev_idx = self.prev_idx.new_full((b, hkv, select_k), -1)

    def rewind_tail(self) -> None:
        """Forget tokens a failed step appended: the device counts go back to the host's."""
        if self.tail_fill is not None:
            self.tail_fill.fill_(self.tail_len - self.tail_shift)
        if self.gen_count is not None:
            self.gen_count.fill_(self.tail_len)
        if getattr(self, "reuse", False):
            self.prev_idx.fill_(-1)  # the selected region may be half-written: fetch it all next step

    def crop_tail(self, kept: int) -> None:
        """Keep the first ``kept`` generated tokens (the cache checked none later is folded)."""
        self.tail_len = kept
        self.rewind_tail()

    def folded_past(self, kept: int, chunks: list[int] | None = None) -> int | None:
        """Tokens past the prompt some row has folded (with ``chunks`` per row, default what it
        holds), if more than ``kept`` (so they cannot be dropped)."""
        if not self.folds:
            return None
        chunk = self.config.chunk_size
        furthest = max(c * chunk - n for c, n in zip(self.chunks if chunks is None else chunks, self.lengths))
        return furthest if furthest > kept else None

    def append_tail(self, k_pre: torch.Tensor, v: torch.Tensor, rope_inputs: list[torch.Tensor],
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
        offsets = None if self.fused_append and not (self.folds and self.writes_tables) \
            else torch.arange(n, device=self.tail_fill.device)
        if self.fused_append:
            dispatch.append_rope(k_pre, v, rope_inputs, self.rope_form, self.k_buf, self.v_buf, self.tail_fill,
                                 self.tail_start, self.pre_k, self.tail_start - self.local_start)
        else:
            slots = self.tail_start + self.tail_fill + offsets
            self.k_buf.index_copy_(2, slots, rope_fn(k_pre, *rope_inputs).to(self.k_buf.dtype))
            self.v_buf.index_copy_(2, slots, v.to(self.v_buf.dtype))
            if self.folds:
                self.pre_k.index_copy_(2, slots - self.local_start, k_pre.to(self.pre_k.dtype))
        if self.folds:
            if self.writes_tables:
                columns = self.padded_len + self.gen_count + offsets
                for table, new in zip(self.rope_tables, rope_inputs):
                    # a one-row table serves sequences whose positions agree (rope_tables.SharedRopeTables)
                    new = new[: table.shape[0]].to(table.dtype)
                    table.index_copy_(2, columns, new.expand(table.shape[0], 1, n, table.shape[3]))
            self.gen_count.add_(n)
        self.tail_fill.add_(n)

    def select(self, q: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k chunks per KV head: ``chunk_idx [B, Hkv, k]`` and whether each pick is real."""
        scores = dispatch.score_chunks(q, self.landmarks, self.selectable, scale)
        return dispatch.top_chunks(scores, self.select_k)

    def fill_selected(self, chunk_idx: torch.Tensor, picked: torch.Tensor, rope_fn: RopeFn) -> None:
        """Rebuild the chosen chunks' keys (low rank, then RoPE at their positions) and fetch their
        values, straight into the buffer's selected region; mark which picks are real.

        With value reuse a chunk chosen again stays in its slot (``reference.stable_slots``): its
        values are already there, only new chunks' values cross PCIe, and nothing is copied aside.
        """
        chunk = self.config.chunk_size
        region = slice(self.sel_start, self.local_start)
        fetch = None
        if self.reuse:
            chunk_idx, picked, fetch = ref.stable_slots(chunk_idx, picked, self.prev_idx)
            self.prev_idx.copy_(chunk_idx)
            self.v_lookups[0] += fetch.numel() - fetch.sum()
            self.v_lookups[1] += fetch.numel()
        dispatch.rebuild_rope_keys(self.u, self.sv, chunk_idx, chunk, self.pad, self.rope_tables, self.rope_form,
                                   rope_fn, self.k_buf[:, :, region])
        dispatch.gather_value_chunks(self.v_chunks, chunk_idx, self.v_buf.device, self.v_buf[:, :, region], fetch)
        # one broadcast copy (repeat_interleave would launch an index build and a gather)
        self.key_valid[:, :, region].unflatten(-1, (-1, chunk)).copy_(picked[..., None].expand(*picked.shape, chunk))

    def decode(self, q: torch.Tensor, k_pre_new: torch.Tensor, v_new: torch.Tensor, rope_inputs: list[torch.Tensor],
               rope_fn: RopeFn, scale: float) -> torch.Tensor:
        """Attend ``q [B, Hq, n, D]`` over outliers + selected chunks + local window + generated tail.

        With several new tokens (speculative verification) each selects its own chunks, as it
        would decoding one at a time, so speculation never changes the output.
        """
        self.append_tail(k_pre_new, v_new, rope_inputs, rope_fn)
        n = q.shape[2]
        if n > 1 and self.compressed:
            return torch.cat([self._attend(q[:, :, i : i + 1], rope_fn, scale, n - 1 - i) for i in range(n)], dim=2)
        return self._attend(q, rope_fn, scale, 0)

    def _attend(self, q: torch.Tensor, rope_fn: RopeFn, scale: float, newer: int) -> torch.Tensor:
        """``q``'s rows are the tail tokens just before the ``newer`` newest ones."""
        if self.compressed:
            self.fill_selected(*self.select(q, scale), rope_fn)
        fill = self.tail_fill - newer if newer else self.tail_fill
        return dispatch.decode_attention(q, self.k_buf, self.v_buf, self.key_valid, self.tail_start, fill, scale,
                                         self.tail_first)

    def memory_bytes(self) -> dict[str, tuple[str, int]]:
        """Bytes per component as ``name -> (device type, bytes)``: the model's device (``"cuda"``,
        or ``"cpu"`` for a CPU model) for the state, ``"cpu"`` for values offloaded to host memory."""
        def size(t: torch.Tensor | None) -> int:
            return 0 if t is None else t.numel() * t.element_size()

        per_token = self.k_buf.shape[0] * self.k_buf.shape[1] * (self.k_buf.shape[3] * self.k_buf.element_size()
                                                                  + self.v_buf.shape[3] * self.v_buf.element_size())
        device = self.k_buf.device.type
        parts: dict[str, tuple[str, int]] = {}
        if self.compressed:
            parts["U"] = (device, size(self.u))
            parts["SV"] = (device, size(self.sv))
            parts["landmarks"] = (device, size(self.landmarks))
            parts["outliers"] = (device, self.sel_start * per_token)
            parts["selected"] = (device, (self.local_start - self.sel_start) * per_token)
            if self.v_chunks.device == self.k_buf.device and self.k_buf.device.type != "cpu":
                parts["device_V"] = (device, size(self.v_chunks))  # spare accelerator memory
            else:
                parts["offloaded_V"] = (self.v_chunks.device.type, size(self.v_chunks))
        if getattr(self, "reuse", False):
            parts["reuse_workspace"] = (device, size(self.prev_idx))
        parts["local"] = (device, (self.tail_start - self.local_start) * per_token + size(self.key_valid))
        parts["tail"] = (device, (self.k_buf.shape[2] - self.tail_start) * per_token)
        if self.folds:
            parts["fold_state"] = (device, size(self.pre_k) + size(self.outlier_ids) + size(self.outlier_cos)
                                   + size(self.tail_first) + size(self.gen_count))
        return parts
