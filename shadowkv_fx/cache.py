"""``ShadowKVCache``: the compressed KV cache, as a ``transformers`` ``Cache``."""
from __future__ import annotations

import contextlib
import logging
import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from shadowkv_fx import cache_io, cache_share, decode_step, dense_fallback, fold, pinned, preflight, rope_detection
from shadowkv_fx.config import ShadowKVConfig
from shadowkv_fx.decode_step import RopeFn
from shadowkv_fx.layer_state import LayerState
from shadowkv_fx.memory_report import cache_report, device_and_host_bytes  # noqa: F401 (documented here too)
from shadowkv_fx.prefill_attention import dense_prefill, stage_piece
from shadowkv_fx.prompt_layout import PromptLayout
from shadowkv_fx.rope_tables import SharedRopeTables

log = logging.getLogger(__name__)

# share of the device kept free when a cache is filled without the optimized model's preflight
# (which sizes the reserve from the model: preflight.work_reserve)
DEVICE_RESERVE = 0.25


class ShadowKVLayer(CacheLayerMixin):
    """Bookkeeping face of one layer for ``transformers``; the state lives in ``LayerState``.

    K/V never pass through ``update``: the rewritten graph hands them to ``torch.ops.shadowkv``.
    """

    is_compileable = False
    is_sliding = False
    is_croppable = True  # generated tokens can be dropped (speculative decoding); see ShadowKVCache.crop

    def __init__(self, owner: "ShadowKVCache", config: ShadowKVConfig) -> None:
        super().__init__()
        # weak: no cache <-> layer cycle, so a finished cache frees its pinned memory and CUDA graphs at once,
        # not whenever the cyclic GC runs (perhaps inside another capture)
        self._owner = weakref.ref(owner)
        self.state = LayerState(config)

    @property
    def owner(self) -> "ShadowKVCache":
        return self._owner()

    def lazy_initialization(self, key_states, value_states) -> None:
        raise RuntimeError("ShadowKVLayer is filled by torch.ops.shadowkv, not by Cache.update")

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError(
            "ShadowKVCache.update was called: this model's attention was not rewritten by shadowkv_fx. "
            "Use shadowkv_fx.optimize(model) before generate()."
        )

    def get_seq_length(self) -> int:
        return self.owner.seq_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.seq_length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state = LayerState(self.state.config)

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("ShadowKV does not support beam search (num_beams > 1)")


class ShadowKVCache(cache_share.SharedCopies, cache_io.SavedCache, Cache):
    """Compressed KV cache for a batch of left-padded prompts.

    Created by the optimized model's ``forward``/``generate``; pass one explicitly as
    ``past_key_values=ShadowKVCache(num_layers, config)`` to keep it after generation. ``tail_capacity`` is how
    many generated tokens fit before the tail buffers grow (``generate`` sizes it from ``max_new_tokens``; growing
    re-captures a CUDA-graphed decode step). A prefilled document is asked many questions through
    ``copy.deepcopy`` or ``batch_repeat_interleave`` (cache_share.py), and kept with ``save_pretrained`` (cache_io.py).
    """

    def __init__(self, num_layers: int, config: ShadowKVConfig | None = None, tail_capacity: int = 64,
                 prefill_chunk_size: int | None = None) -> None:
        if tail_capacity < 1:
            raise ValueError(f"tail_capacity must be >= 1, got {tail_capacity}")
        if prefill_chunk_size is not None and prefill_chunk_size < 1:
            raise ValueError(f"prefill_chunk_size must be >= 1 or None, got {prefill_chunk_size}")
        self.config = config or ShadowKVConfig()
        dense_fallback.check_layers(self.config, num_layers)
        super().__init__(layers=[ShadowKVLayer(self, self.config.for_layer(i)) for i in range(num_layers)])
        self.tail_capacity = tail_capacity
        # prompts longer than this go through the model in pieces; all of it is compressed at the end
        self.prefill_chunk_size = prefill_chunk_size
        # set by generate: tokens past it in the first forward are drafts to verify, not prompt
        self.prompt_length: int | None = None
        self.prefill_span = (0, 0)
        # prefill runs ``prefill_rows`` sequences at a time (None: the whole batch at once), so
        # the device holds one group's dense K/V, never the batch's
        self.prefill_rows = self.config.prefill_rows
        self.group_rows: list[int] = []
        self.group_layout: PromptLayout | None = None
        self._staged: dict[int, tuple[torch.Tensor, ...]] = {}
        self.device_value_bytes = 0
        # spare accelerator bytes for the values, the state set aside: the preflight's plan (or the first layer's)
        self.value_room: int | None = None
        self.layout: PromptLayout | None = None
        self.realigned = False  # the prompt came right-padded and was moved to the left
        self.seq_length = 0
        self.phase = "prefill"
        self.touched: set[int] = set()
        self.rope_tables = SharedRopeTables()
        # captured decode steps of this cache (cuda_graph.py); they hold its buffers' addresses
        self.decode_graphs: dict = {}
        # while a step of several tokens runs: the fewest generated tokens a crop may leave after it
        # (speculation drops rejected drafts); folds at points past it are kept in fold_undo as
        # (point, one FoldUndo per layer), so such a crop takes them back
        self.crop_floor: int | None = None
        self.fold_undo: list[tuple[int, list[fold.FoldUndo]]] = []
        # a prompt too short to compress decodes densely: say so once, at its prefill
        self.warn_short_prompts = True
        self.source_model = None  # weakref of the optimized model that prefilled it (save_pretrained records it)
        self.saved_model = None  # a loaded cache's model_identity, until a forward has checked its model

    @property
    def is_compileable(self) -> bool:
        return False

    def begin_step(self, key_valid: torch.Tensor | None, input_len: int, realigned: bool = False) -> None:
        """Record what the next forward holds: a whole prompt (prefill) or ``input_len`` new tokens (decode)."""
        self.touched = set()
        if self.layout is None:
            self.phase = "prefill"
            self.layout = PromptLayout.from_mask(key_valid, self.config)
            pinned.POOL.expect(len(self.layers))  # one host value store per layer, faulted in ahead
            self.realigned = realigned
            if self.warn_short_prompts and self.dense_prompts:
                log.warning(
                    "%d of %d prompts are shorter than %d tokens, (local_chunks + outlier_chunks + 1) * chunk_size, "
                    "so they are not compressed and decode densely; lower outlier_chunks, local_chunks or "
                    "chunk_size to compress shorter prompts", self.dense_prompts, len(self.layout.lengths),
                    self.config.min_sparse_prompt)
            self.begin_group(list(range(len(self.layout.lengths))), 0)
            return
        self.phase = "decode"
        if self.crop_floor is None:
            self.fold_undo = []  # a new step: no crop can reach back past the last one's tokens
        undo = [] if self.crop_floor is not None and self.generated > self.crop_floor else None
        for layer in self.layers:
            layer.state.values_ready()  # the prefill's host copies land before a step reads them
            if cache_share.own_store_before_fold(layer.state):  # a store shared with copies is never written
                self.decode_graphs.clear()
            fold.fold(layer.state, undo)  # in place: a captured step stays valid
        if undo:
            self.fold_undo.append((self.generated, undo))
        moved = [layer.state.reserve_tail(input_len) for layer in self.layers]
        if any(moved):
            self.decode_graphs.clear()

    def rollback(self) -> None:
        """Forget a step that failed half-way, so no layer keeps tokens the others lack."""
        self.decode_graphs.clear()
        if self.phase == "prefill":
            self.layout = None
            self.realigned = False
            self._staged = {}
            self.device_value_bytes = 0
            self.value_room = None
            self.fold_undo = []
            self.rope_tables = SharedRopeTables()
            for layer in self.layers:
                layer.reset()
        else:
            for layer in self.layers:
                layer.state.rewind_tail()

    def prefill_groups(self) -> list[list[int]]:
        """Batch rows that go through the model together at prefill, longest prompts first."""
        rows = sorted(range(len(self.layout.lengths)), key=lambda b: -self.layout.lengths[b])
        size = self.prefill_rows or len(rows)
        return [rows[i : i + size] for i in range(0, len(rows), size)]

    def begin_group(self, rows: list[int], first: int) -> None:
        """The next prefill forward holds batch rows ``rows``, from padded column ``first`` on."""
        layout = self.layout
        self.group_rows = rows
        self.group_layout = PromptLayout([layout.pad[b] - first for b in rows], [layout.lengths[b] for b in rows],
                                         [layout.chunks[b] for b in rows], layout.padded_len - first)
        self.prefill_span = (0, self.group_layout.padded_len)

    def prefill_spans(self) -> list[tuple[int, int]]:
        """The pieces ``[start, end)`` of the group's prompts that go through the model one at a time."""
        total = self.group_layout.padded_len
        size = self.prefill_chunk_size or total
        return [(start, min(total, start + size)) for start in range(0, total, size)]

    def begin_span(self, span: tuple[int, int]) -> None:
        self.touched = set()
        self.prefill_span = span

    def check_all_layers_ran(self, replayed: bool = False) -> None:
        if replayed:
            self.touched = set(range(len(self.layers)))
        missing = sorted(set(range(len(self.layers))) - self.touched)
        if missing:
            self.rollback()
            raise RuntimeError(
                f"the ShadowKV attention op did not run for layers {missing[:8]}: the compiled graph fell "
                "back to eager or lost the rewrite. Nothing was cached for this step."
            )

    def end_step(self, input_len: int, replayed: bool = False) -> None:
        """Commit a step. ``replayed``: a captured graph ran it, whose capture saw every layer's op run."""
        self.check_all_layers_ran(replayed)
        if self.phase == "decode":
            for layer in self.layers:
                layer.state.advance(input_len)
        elif self.layout is not None:
            pinned.POOL.settle()  # the store blocks prefetched for layers whose values stayed on the GPU
            rope_detection.settle([layer.state for layer in self.layers])  # every layer's RoPE checks: one host read
            self.rope_tables.forget_sources(self.prefill_span[1] == self.group_layout.padded_len)
            # folding layers size their RoPE tables and store now, so the first decode step moves nothing
            for layer in self.layers:
                layer.state.bases.finish()  # prefill's key bases (key_basis.py), before a tail may move them
                if layer.state.reserve_tail(0):
                    self.decode_graphs.clear()
        self.seq_length += input_len

    @property
    def generated(self) -> int:
        """Tokens past the prompt in the cache (generated, or later turns)."""
        return self.seq_length - self.layout.padded_len

    def next_fold_point(self, input_len: int) -> int | None:
        """Where a decode step of ``input_len`` tokens must be split so that every token sees the
        state one-token-at-a-time decoding gives it (``fold.next_fold_point``); None: nowhere.
        Layers whose rows compressed alike fold alike (the rule reads token counts only): one of each answers."""
        points = [fold.next_fold_point(s, input_len) for s in dense_fallback.fold_schedules(
            layer.state for layer in self.layers)]
        return min((p for p in points if p is not None), default=None)

    @contextlib.contextmanager
    def croppable_from(self, generated: int):
        """Within: a crop after this step may leave as few as ``generated`` generated tokens, so
        folds past that point are recorded for ``crop`` to take back. Nested: the lowest holds."""
        outer = self.crop_floor
        if outer is None:
            self.fold_undo = []
        self.crop_floor = generated if outer is None else min(outer, generated)
        try:
            yield
        finally:
            self.crop_floor = outer

    def max_position(self, input_len: int) -> int:
        """One past the largest position the next ``input_len`` tokens take (no device read)."""
        return max(self.layout.lengths) + self.seq_length - self.layout.padded_len + input_len

    def next_positions(self, input_len: int, device: torch.device) -> torch.Tensor:
        """Positions (``[B, n]``) of the next ``n`` tokens of each sequence."""
        lengths = torch.tensor(self.layout.lengths, device=device)
        start = lengths + self.seq_length - self.layout.padded_len
        return start[:, None] + torch.arange(input_len, device=device)

    def crop(self, max_length: int) -> None:
        """Forget generated tokens (speculative decoding drops rejected drafts).

        ``max_length < 0`` removes that many tokens (transformers >= 5.24 calls it so); ``> 0`` is the
        length to keep (the older spelling); 0 removes nothing. The compressed prompt cannot be cut.
        transformers 5.17's assisted decoding passes a 0-d tensor: it becomes a Python int here, or
        it would be shared (and added to in place) by every layer's tail count.
        """
        max_length = int(max_length)
        if max_length == 0:
            return
        if max_length < 0:
            max_length = self.seq_length + max_length
        if self.layout is None or max_length >= self.seq_length:
            return
        if max_length < self.layout.padded_len:
            raise ValueError(
                f"cannot crop a ShadowKV cache to {max_length} tokens: its prompt of {self.layout.padded_len} "
                "is compressed; only generated tokens can be dropped"
            )
        kept = max_length - self.layout.padded_len
        # folds at points past ``kept`` (inside the step being cropped) are taken back first
        undone = [undo for point, undo in self.fold_undo if point > kept]
        before = undone[0][0].chunks if undone else None
        folded = max((f for f in (fold.folded_past(layer.state, kept, before) for layer in self.layers)
                      if f is not None), default=None)
        if folded is not None:
            raise ValueError(
                f"cannot crop a ShadowKV cache to {max_length} tokens: its first {self.layout.padded_len + folded} "
                "are folded into the compressed store (ShadowKVConfig.fold_chunks); only tokens after that can be "
                "dropped"
            )
        for undo in reversed(undone):
            for layer_undo in undo:
                layer_undo.restore()
        self.fold_undo = self.fold_undo[: len(self.fold_undo) - len(undone)]
        for layer in self.layers:
            layer.state.crop_tail(kept)
        self.seq_length = max_length

    def _keep_values_on_device(self, nbytes: int) -> bool:
        """Grant ``nbytes`` of accelerator memory to a layer's values, within ``value_room``."""
        if not self.value_room or self.device_value_bytes + nbytes > self.value_room:
            return False
        self.device_value_bytes += nbytes
        return True

    def _plan_value_room(self, k_pre: torch.Tensor, v: torch.Tensor) -> int:
        """Spare accelerator bytes for values: free memory beyond the reserve kept for prefill and
        decode work, less the compressed state every layer of the batch will allocate (granting
        values room layer by layer first would leave the last layers' state none), within
        ``value_hbm_gib``."""
        if k_pre.device.type != "cuda":
            return 0
        state = preflight.state_footprint(len(self.layers), k_pre.shape[1], k_pre.shape[-1], v.dtype, self.layout,
                                          self.config, self.tail_capacity)
        free, total = preflight.device_memory(k_pre.device)
        return preflight.values_room(free - DEVICE_RESERVE * total, state, len(self.layout.lengths), self.config)

    def widen_tables_for(self, position_ids: torch.Tensor) -> None:
        """Give every sequence its own RoPE table rows before a step whose caller-given positions
        differ between sequences."""
        if self.rope_tables.widen_for(position_ids, len(self.layout.lengths)):
            self.decode_graphs.clear()  # captured steps read the old tables

    def attention(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k_pre: torch.Tensor,
        v: torch.Tensor,
        rope_inputs: list[torch.Tensor],
        rope_fn: RopeFn,
        scale: float,
    ) -> torch.Tensor:
        """Run one layer's attention: dense + compress at prefill, sparse at decode."""
        if layer_idx >= len(self.layers):
            raise RuntimeError(f"attention site {layer_idx} but the cache has {len(self.layers)} layers")
        self.touched.add(layer_idx)
        state = self.layers[layer_idx].state
        if self.phase == "decode":
            return decode_step.decode(state, q, k_pre, v, rope_inputs, rope_fn, scale)
        k_rot = rope_fn(k_pre, *rope_inputs)
        (start, end), total = self.prefill_span, self.group_layout.padded_len
        k_pre, k_rot, v = stage_piece(self._staged, layer_idx, (start, end), total, (k_pre, k_rot, v))
        tables = self.rope_tables.pieces.stage(layer_idx, list(rope_inputs), (start, end), total, self.group_rows)
        out = dense_prefill(q, k_rot, v, self.group_layout, scale, start)
        if end == self.group_layout.padded_len:
            self.compress_group(layer_idx, k_pre, k_rot, v, tables, dense_fallback.low_recall_rows(
                state.config, layer_idx, q, k_rot, self.group_layout, self.group_rows, scale))
        return out

    def compress_group(self, layer_idx: int, k_pre: torch.Tensor, k_rot: torch.Tensor, v: torch.Tensor,
                       rope_tables: list[torch.Tensor], keep_dense: frozenset[int] = frozenset()) -> None:
        """Compress one layer's whole prompt K/V of the current group of rows into their slots.

        ``k_pre, k_rot, v: [rows, Hkv, S_g, D]`` in the group's layout; ``rope_tables`` the RoPE inputs per
        position the keys were rotated with (``[rows|1, 1, S_g, c]``); ``keep_dense``: batch rows kept dense."""
        if self.value_room is None:
            self.value_room = self._plan_value_room(k_pre, v)
        group, layout = dense_fallback.layer_layouts(self.config, layer_idx, self.group_rows, keep_dense,
                                                     self.group_layout, self.layout)
        # this group's rows of the layer's RoPE inputs, in the batch's shared tables (a layer without a store reads
        # none: it never rebuilds or folds, so the first layer that may writes the generated tokens' columns)
        reads = dense_fallback.reads_tables(self.layers[layer_idx].state, layout, self.layout)
        shared, writes = self.rope_tables.for_layer(layer_idx, rope_tables, self.group_rows, self.group_layout,
                                                    self.layout) if reads else ([], False)
        self.layers[layer_idx].state.add_rows(self.group_rows, k_pre, k_rot, v, group, layout, shared, writes,
                                              self.tail_capacity, self._keep_values_on_device)

    def value_hit_rate(self) -> float | None:
        """Share of chosen value chunks served from the previous step's copy on the device, over
        every decode step so far (None when no layer fetches offloaded values)."""
        counts = [layer.state.v_lookups for layer in self.layers if layer.state.reuse]
        if not counts:
            return None
        hits, asked = torch.stack(counts).sum(dim=0).tolist()
        return hits / asked if asked else None

    @property
    def dense_prompts(self) -> int:
        """Prompts of the batch too short to compress (``config.min_sparse_prompt``): they decode densely."""
        return 0 if self.layout is None else sum(1 for chunks in self.layout.chunks if chunks == 0)

    def memory_report(self) -> dict[str, dict[str, int]]:
        """Bytes per component, keyed by the device type that holds them, beside the dense cache
        for the same tokens.

        Returns ``{device_type: {component: bytes}, "dense": {"kv": bytes}, "uncompressed":
        {"prompts": n, "min_prompt_tokens": m}}``: on a GPU model ``"cuda"`` holds the compressed
        state and ``"cpu"`` the values offloaded to pinned host memory (``offloaded_V``); on a CPU
        model everything is under ``"cpu"``, one RAM. ``uncompressed`` counts the prompts shorter
        than ``m`` tokens, which are not compressed and decode densely (dense_fallback layers: ``cache_report``).
        """
        return cache_report([layer.state for layer in self.layers], self.layout, self.rope_tables.nbytes(),
                            {"prompts": self.dense_prompts, "min_prompt_tokens": self.config.min_sparse_prompt})
