"""``SlotCache``: the running ShadowKV cache of continuous batching (``serving.shadowkv_slots``).

``num_slots`` rows, each sized once for any request that fits ``max_length``
(``slot_state.slot_sizes``). A request's prompt is prefilled alone, in a batch-1
``ShadowKVCache``, and then joins a free row in place (``adopt``); every decode step runs all
rows at once, with static shapes, so one captured CUDA graph serves every admission. Per row:

- **positions**: a row's next token sits at its prompt length plus the decode steps since it
  joined (``tail_len - tail_origin[b]``); the model gets them as ``position_ids``, so each row's
  RoPE is its own. There is no padding: the RoPE tables (``[num_slots, 1, max_length, c]``, one row
  per slot) are indexed by position, and each step writes a row's new column at its own position
  (``decode_step._write_row_columns``), where a fold's rebuild reads it.
- **tail**: one dense tail for all rows, written at one device-side fill level per step. A row's
  tokens are the slots from where it joined (``tail_first[b]``, the fill then) to the fill; the
  slots before, older rows' tokens, are masked for it.
- **folding** (``fold.py``): each row folds its own oldest dense chunks as it would alone (its
  generated count is counted from ``tail_origin[b]``); free rows never fold.

The tail stays bounded over any number of steps: before each step free rows are parked at the
fill (``LayerState.park_rows``), folds run, and ``fold.compact`` drops the leading slots no row
reads any more, so the fill comes back to the most dense tokens one live row holds: at most the
fold window for rows that fold, or a row's generated tokens for one that never folds (a prompt
too short to compress). Only such a row can outgrow the tail; then the buffers are re-laid out
with double the room (``LayerState.reserve_tail``, which drops the captured step): at most
``log2(max_length / tail)`` times in the cache's life, as capacity never shrinks.
"""
from __future__ import annotations

import torch

from shadowkv_fx import fold, slot_state
from shadowkv_fx.cache import ShadowKVCache
from shadowkv_fx.config import ShadowKVConfig
from shadowkv_fx.memory_report import cache_report
from shadowkv_fx.prompt_layout import PromptLayout


class SlotCache(ShadowKVCache):
    """The running cache of ``num_slots`` rows; ``adopt`` a prefilled prompt into a free row,
    ``release`` it when its request ends. ``tail_capacity``: dense tail slots before the tail first
    grows (default ``slot_state.slot_sizes``'s)."""

    def __init__(self, num_layers: int, config: ShadowKVConfig, num_slots: int, max_length: int,
                 tail_capacity: int | None = None, value_room: int = 0) -> None:
        if config.dense_layers or (config.dense_fallback_error, config.dense_fallback_recall) != (None, None):
            raise ValueError("continuous batching sizes each slot's local window once, for prompts too short to "
                             "compress, not for whole prompts kept dense: serve with ShadowKVConfig(dense_layers=(), "
                             "dense_fallback_error=None, dense_fallback_recall=None)")
        self.sizes = slot_state.slot_sizes(config, max_length, tail_capacity)
        super().__init__(num_layers, config, self.sizes.tail)
        self.num_slots, self.max_length = num_slots, max_length
        # the runtime decodes a cache whose layout is set; a slot's row is described by its state
        self.layout = PromptLayout([0] * num_slots, [0] * num_slots, [0] * num_slots, 0)
        self.phase = "decode"
        self.live = [False] * num_slots  # the row holds a request's prompt
        self.value_room = value_room  # accelerator bytes the values may take (pinned host memory past it)
        self.allocated = False

    def adopt(self, slot: int, prefilled: ShadowKVCache) -> None:
        """Row ``slot`` takes the one prompt of ``prefilled`` (a batch-1 cache after its prefill)."""
        if self.live[slot]:
            raise RuntimeError(f"slot {slot} still holds a request; release it first")
        if len(prefilled.layers) != len(self.layers) or prefilled.layout is None or len(prefilled.layout.lengths) != 1:
            raise ValueError("adopt takes a batch-1 ShadowKVCache of the same model, after its prefill")
        if not self.allocated:
            self._allocate(prefilled)
        dropped = [slot_state.adopt_row(layer.state, slot, other.state)
                   for layer, other in zip(self.layers, prefilled.layers)]
        if any(dropped):
            self.decode_graphs.clear()
        self.layout.lengths[slot], self.layout.chunks[slot] = prefilled.layout.lengths[0], prefilled.layout.chunks[0]
        self.live[slot] = True

    def release(self, slot: int) -> None:
        """The row's request is over: it is parked before the next step (its memory stays, preallocated)."""
        self.live[slot] = False

    def _allocate(self, prefilled: ShadowKVCache) -> None:
        """Every layer's slots, shaped after the first prompt's state; RoPE tables one set per set
        the prompt's layers share."""
        sets: dict[int, list[torch.Tensor]] = {}
        for layer, other in zip(self.layers, prefilled.layers):
            own = other.state.rope_tables
            if id(own) not in sets:
                sets[id(own)] = self.rope_tables.for_slots(own, self.num_slots, self.max_length)
            layer.state.allocate_slots(other.state, self.num_slots, self.sizes, sets[id(own)],
                                       other.state.writes_tables, self._keep_values_on_device)
        self.allocated = True

    def row_positions(self) -> list[int]:
        """The position of each row's next token (0 for free rows: no garbage position reaches the model's RoPE)."""
        state = self.layers[0].state
        return [n + state.tail_len - origin if live else 0
                for n, origin, live in zip(state.lengths, state.tail_origin, self.live)]

    def begin_step(self, key_valid: torch.Tensor | None, input_len: int, realigned: bool = False) -> None:
        """Park free rows, fold and compact every layer's tail, make room for the step."""
        if not self.allocated or not any(self.live):
            raise RuntimeError("no slot holds a prompt: adopt one before a decode step")
        self.touched = set()
        free = [b for b, live in enumerate(self.live) if not live]
        moved = False
        for layer in self.layers:
            layer.state.park_rows(free)
            fold.fold(layer.state)  # in place: a captured step stays valid
            fold.compact(layer.state)
            moved |= layer.state.reserve_tail(input_len)
        if moved:
            self.decode_graphs.clear()

    def end_step(self, input_len: int, replayed: bool = False) -> None:
        super().end_step(input_len, replayed)
        # what transformers reads as the cache's length (its masks, which the rewritten attention never uses)
        self.seq_length = self.max_position(0)

    def next_positions(self, input_len: int, device: torch.device) -> torch.Tensor:
        start = torch.tensor(self.row_positions(), device=device)
        return start[:, None] + torch.arange(input_len, device=device)

    def max_position(self, input_len: int) -> int:
        return max(self.row_positions()) + input_len

    def memory_report(self) -> dict[str, dict[str, int]]:
        """``ShadowKVCache.memory_report`` of the slots: the preallocated state, beside the dense
        cache the live rows' tokens would take; ``uncompressed`` counts the live rows' prompts."""
        live = [b for b, on in enumerate(self.live) if on]
        uncompressed = {"prompts": sum(1 for b in live if not self.layout.chunks[b]),
                        "min_prompt_tokens": self.config.min_sparse_prompt}
        return cache_report([layer.state for layer in self.layers], self.layout if self.allocated else None,
                            self.rope_tables.nbytes(), uncompressed, sum(self.row_positions()))

    def crop(self, max_length: int) -> None:
        raise ValueError("a running slot cache cannot be cropped: its rows are requests of their own")
