"""``ShadowKVCache``: the compressed KV cache, as a ``transformers`` ``Cache``."""
from __future__ import annotations

import weakref
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from shadowkv_fx.config import ShadowKVConfig
from shadowkv_fx.layer_state import LayerState, PromptLayout, RopeFn


class ShadowKVLayer(CacheLayerMixin):
    """Bookkeeping face of one layer for ``transformers``; the state lives in ``LayerState``.

    K/V never pass through ``update``: the rewritten graph hands them to ``torch.ops.shadowkv``.
    """

    is_compileable = False
    is_sliding = False

    def __init__(self, owner: "ShadowKVCache", config: ShadowKVConfig) -> None:
        super().__init__()
        # weak: no cache <-> layer cycle, so a finished cache frees its pinned host memory and
        # CUDA graphs at once, not whenever the cyclic GC runs (perhaps inside another capture)
        self._owner = weakref.ref(owner)
        self.state = LayerState(config)

    @property
    def owner(self) -> "ShadowKVCache":
        return self._owner()

    def lazy_initialization(self, key_states, value_states) -> None:
        raise RuntimeError("ShadowKVLayer is filled by torch.ops.shadowkv, not by Cache.update")

    def update(self, key_states, value_states, cache_kwargs=None):
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


class ShadowKVCache(Cache):
    """Compressed KV cache for a batch of left-padded prompts.

    Created by the optimized model's ``forward``/``generate``; pass one explicitly as
    ``past_key_values=ShadowKVCache(num_layers, config)`` to keep it after generation.
    ``tail_capacity`` is how many generated tokens fit before the tail buffers grow (``generate``
    sizes it from ``max_new_tokens``; growing re-captures a CUDA-graphed decode step).
    """

    def __init__(self, num_layers: int, config: ShadowKVConfig | None = None, tail_capacity: int = 64) -> None:
        if tail_capacity < 1:
            raise ValueError(f"tail_capacity must be >= 1, got {tail_capacity}")
        self.config = config or ShadowKVConfig()
        super().__init__(layers=[ShadowKVLayer(self, self.config) for _ in range(num_layers)])
        self.tail_capacity = tail_capacity
        self.layout: PromptLayout | None = None
        self.seq_length = 0
        self.phase = "prefill"
        self.touched: set[int] = set()
        self._shared_tables: list[list[torch.Tensor]] = []
        # captured decode steps of this cache (cuda_graph.py); they hold its buffers' addresses
        self.decode_graphs: dict = {}

    @property
    def is_compileable(self) -> bool:
        return False

    def begin_step(self, key_valid: torch.Tensor | None, input_len: int) -> None:
        """Record what the next forward holds: a whole prompt (prefill) or ``input_len`` new tokens (decode)."""
        self.touched = set()
        if self.layout is None:
            self.phase = "prefill"
            self.layout = PromptLayout.from_mask(key_valid, self.config)
            return
        self.phase = "decode"
        moved = [layer.state.reserve_tail(input_len) for layer in self.layers]
        if any(moved):
            self.decode_graphs.clear()

    def rollback(self) -> None:
        """Forget a step that failed half-way, so no layer keeps tokens the others lack."""
        self.decode_graphs.clear()
        if self.phase == "prefill":
            self.layout = None
            self._shared_tables = []
            for layer in self.layers:
                layer.reset()
        else:
            for layer in self.layers:
                layer.state.rewind_tail()

    def end_step(self, input_len: int, replayed: bool = False) -> None:
        """Commit a step. ``replayed``: a captured graph ran it, whose capture saw every layer's op run."""
        if replayed:
            self.touched = set(range(len(self.layers)))
        missing = sorted(set(range(len(self.layers))) - self.touched)
        if missing:
            self.rollback()
            raise RuntimeError(
                f"the ShadowKV attention op did not run for layers {missing[:8]}: the compiled graph fell "
                "back to eager or lost the rewrite. Nothing was cached for this step."
            )
        if self.phase == "decode":
            for layer in self.layers:
                layer.state.tail_len += input_len
        self.seq_length += input_len

    def max_position(self, input_len: int) -> int:
        """One past the largest position the next ``input_len`` tokens take (no device read)."""
        return max(self.layout.lengths) + self.seq_length - self.layout.padded_len + input_len

    def next_positions(self, input_len: int, device: torch.device) -> torch.Tensor:
        """Positions (``[B, n]``) of the next ``n`` tokens of each sequence."""
        lengths = torch.tensor(self.layout.lengths, device=device)
        start = lengths + self.seq_length - self.layout.padded_len
        return start[:, None] + torch.arange(input_len, device=device)

    def _tables(self, rope_inputs: list[torch.Tensor], batch: int) -> list[torch.Tensor]:
        """Per-position RoPE inputs, stored once when layers share them (they usually do)."""
        for tables in self._shared_tables:
            if len(tables) == len(rope_inputs) and all(
                s.shape[1:] == t.shape[1:] and s.dtype == t.dtype and torch.equal(s, t.expand_as(s))
                for s, t in zip(tables, rope_inputs)
            ):
                return tables
        # a copy, never a view: under CUDA graphs the inputs live in memory the next replay reuses
        tables = [t.expand(batch, *t.shape[1:]).clone(memory_format=torch.contiguous_format) for t in rope_inputs]
        self._shared_tables.append(tables)
        return tables

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
        k_rot = rope_fn(k_pre, *rope_inputs)
        if self.phase == "decode":
            return state.decode(q, k_rot, v, rope_fn, scale)
        out = _dense_prefill(q, k_rot, v, self.layout, scale)
        state.prefill(k_pre, k_rot, v, self._tables(rope_inputs, q.shape[0]), self.layout, self.tail_capacity)
        return out

    def memory_report(self) -> dict[str, dict[str, int]]:
        """Bytes per component and device, beside the dense cache for the same tokens.

        Returns ``{"gpu"|"cpu": {component: bytes}, "dense": {"kv": bytes}}`` ("gpu" means the
        model's device, which is the CPU for a CPU model).
        """
        report: dict[str, dict[str, int]] = {"gpu": {}, "cpu": {}, "dense": {"kv": 0}}
        for layer in self.layers:
            state = layer.state
            if self.layout is None or state.tail_k is None:
                continue
            for name, (side, nbytes) in state.memory_bytes().items():
                report[side][name] = report[side].get(name, 0) + nbytes
            b, hkv, _, d = state.local_k.shape
            tokens = sum(self.layout.lengths) + b * state.tail_len
            report["dense"]["kv"] += 2 * tokens * hkv * d * state.local_k.element_size()
        report["gpu"]["rope_tables"] = sum(t.numel() * t.element_size() for ts in self._shared_tables for t in ts)
        return report


def _dense_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PromptLayout, scale: float) -> torch.Tensor:
    """Causal attention per sequence over its real tokens; pad rows are zero (never read)."""
    out = torch.zeros_like(q)
    group = q.shape[1] // k.shape[1]
    for b, start in enumerate(layout.pad):
        # explicit head repeat: SDPA's flash kernel takes no GQA, and the math fallback would
        # materialise S x S scores per head
        kb = k[b : b + 1, :, start:].repeat_interleave(group, dim=1)
        vb = v[b : b + 1, :, start:].repeat_interleave(group, dim=1)
        out[b : b + 1, :, start:] = torch.nn.functional.scaled_dot_product_attention(
            q[b : b + 1, :, start:], kb, vb, is_causal=True, scale=scale
        )
    return out


def prompt_mask(attention_mask: torch.Tensor | None, input_ids_shape: torch.Size, device: Any) -> torch.Tensor:
    """Validate a 2-D mask as left padding and return it as bool ``[B, S]``."""
    b, s = input_ids_shape
    if attention_mask is None:
        return torch.ones(b, s, dtype=torch.bool, device=device)
    mask = attention_mask.to(torch.bool)
    if mask.dim() != 2 or tuple(mask.shape) != (b, s):
        raise ValueError(f"attention_mask must be 2-D [batch, seq] = {(b, s)}, got {tuple(mask.shape)}")
    if (mask[:, 1:].int() < mask[:, :-1].int()).any():
        raise ValueError(
            "attention_mask has padding after real tokens: ShadowKV needs left padding "
            "(tokenizer.padding_side = 'left')"
        )
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"empty prompt in batch rows {empty}: every sequence needs at least one token")
    return mask

