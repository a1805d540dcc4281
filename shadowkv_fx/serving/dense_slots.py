"""The exact reference ``SlotBackend``: one transformers ``DynamicCache`` per slot.

Every slot runs through the unmodified model at batch 1, so each request computes exactly what a
plain ``model.generate()`` of it alone computes (the prefill in pieces of ``prefill_chunk`` tokens
instead of one: the same attention, summed in a different order). Slow on purpose (one forward per
active slot per step): it exists to test the scheduler and to compare a fast backend against.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers import DynamicCache

from shadowkv_fx import compat


class DenseSlots:
    def __init__(self, model, num_slots: int, max_length: int, prefill_chunk: int = 512):
        if num_slots < 1 or max_length < 2 or prefill_chunk < 1:
            raise ValueError(f"DenseSlots needs num_slots >= 1, max_length >= 2 and prefill_chunk >= 1, got "
                             f"{num_slots}, {max_length} and {prefill_chunk}")
        if getattr(model, "_shadowkv", None) is not None:
            raise ValueError("DenseSlots runs the dense model, and this one is optimized by shadowkv_fx.optimize(): "
                             "call shadowkv_fx.restore(model) to serve it dense, or pass a ShadowKV SlotBackend")
        self.model = model
        self.num_slots = num_slots
        self.max_length = max_length
        self.prefill_chunk = prefill_chunk
        self._caches: list[DynamicCache | None] = [None] * num_slots

    def occupied_slots(self) -> list[int]:
        return [slot for slot, cache in enumerate(self._caches) if cache is not None]

    def prefill(self, slot: int, prompt_ids: torch.Tensor, prefix_len: int | None = None
                ) -> Iterator[torch.Tensor | None]:
        """``prefix_len`` (where a document ends) changes nothing here: dense attention is exact however
        the prompt is split, so the reference's answer is the one a prefix store must reproduce."""
        if self._caches[slot] is not None:
            raise RuntimeError(f"slot {slot} still holds a request; release it before prefilling into it")
        if not 0 < prompt_ids.numel() < self.max_length:
            raise ValueError(f"a prompt of {prompt_ids.numel()} tokens does not fit a slot of max_length "
                             f"{self.max_length}")
        cache = DynamicCache(config=self.model.config)
        self._caches[slot] = cache  # claimed now, so a release() mid-prefill frees it
        ids = prompt_ids.to(self.model.device)[None]
        starts = range(0, ids.shape[1], self.prefill_chunk)
        for start in starts:
            piece = ids[:, start:start + self.prefill_chunk]
            with torch.no_grad():  # per call, not across the yield: grad mode is the caller's between pieces
                logits = self.model(input_ids=piece, **{compat.CACHE_ARG: cache}, use_cache=True,
                                    logits_to_keep=1).logits
            if start + self.prefill_chunk < ids.shape[1]:
                yield None
        yield logits[0, -1]

    def decode(self, tokens: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        rows = {}
        for slot in active.nonzero().flatten().tolist():
            cache = self._caches[slot]
            if cache is None:
                raise RuntimeError(f"decode of slot {slot}, which holds no prefilled request")
            if cache.get_seq_length() >= self.max_length:
                raise RuntimeError(f"slot {slot} is full ({self.max_length} positions)")
            token = tokens[slot].view(1, 1).to(self.model.device)
            with torch.no_grad():
                rows[slot] = self.model(input_ids=token, **{compat.CACHE_ARG: cache}, use_cache=True).logits[0, -1]
        vocab = self.model.get_output_embeddings().out_features
        logits = torch.full((self.num_slots, vocab), float("nan"), device=self.model.device)  # inactive: garbage
        for slot, row in rows.items():
            logits[slot] = row
        return logits

    def release(self, slot: int) -> None:
        self._caches[slot] = None
