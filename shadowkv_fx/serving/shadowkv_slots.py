"""``ShadowKVSlots``: the ``SlotBackend`` of a model optimized by ``shadowkv_fx.optimize``.

A request's prompt runs through the model alone, in a batch-1 ``ShadowKVCache``, the way
``generate()`` of it alone prefills it, in pieces of ``prefill_chunk`` tokens (the others decode
between two pieces); its compressed state then joins a free row of one running ``SlotCache`` in
place. Each decode step runs all ``num_slots`` rows through the optimized model's forward, each
row at its own position, so the runtime captures the step as one CUDA graph
(``optimize(..., cuda_graphs=True)``) and replays it across admissions: no admission moves a
buffer. ``slot_cache`` says how positions, RoPE tables, tails and folding work per row, and how
the shared tail stays bounded over any number of steps.

A request whose prompt starts with a document (``prefix_store``) is prefilled as transformers'
prompt-reuse recipe does it: the document alone (or a copy of it, stored), then the rest of the
prompt through the model on that cache, into its dense tail; the row takes that tail with it.

A row computes what ``generate()`` of its request alone computes: the same prefill and
compression, the same chunks selected (a step selects ``select_k`` chunks per head from the
running store, sized for ``max_length``; where the request alone would select fewer, that was
every chunk it can select, which the larger pick holds as well), the same folds. Floats may differ
in the last bits (batched matmuls, key order in the buffers).

Unlike ``DenseSlots``, a prefilled row must take part in every decode step until it is released
(the scheduler always does so): rows share one dense tail, written at one fill level per step, so
a row skipped by a step would find that step's garbage token among its own. ``decode`` refuses
such a call.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections import Counter
from collections.abc import Generator, Iterator

import torch

from shadowkv_fx import compat
from shadowkv_fx.cache import ShadowKVCache
from shadowkv_fx.config import ShadowKVConfig
from shadowkv_fx.serving.prefix_store import PrefixStore, check_prefix_len
from shadowkv_fx.slot_cache import SlotCache

log = logging.getLogger(__name__)


class ShadowKVSlots:
    """``num_slots`` ShadowKV rows of up to ``max_length`` positions each.

    ``tail_capacity``: dense tail slots before the shared tail first grows (``slot_state.slot_sizes``;
    ``max_length`` means it never moves). ``config``: the ShadowKV settings of the caches (default:
    the model's; the compiled graph does not depend on them). Values go to pinned host memory on a
    GPU, or up to ``config.value_hbm_gib`` GiB of device memory when that is set. ``prefix_store``:
    documents prefilled once; a request whose prompt starts with one, or that says where its
    document ends (``prefix_len``), starts from it and prefills only the rest (``prefix_store``).
    """

    def __init__(self, model, num_slots: int, max_length: int, prefill_chunk: int = 512, *,
                 tail_capacity: int | None = None, config: ShadowKVConfig | None = None,
                 prefix_store: PrefixStore | None = None):
        runtime = getattr(model, "_shadowkv", None)
        if runtime is None:
            raise ValueError("ShadowKVSlots serves a model optimized by shadowkv_fx.optimize(model): optimize it "
                             "first, or serve the dense model with DenseSlots")
        config = config or runtime.config
        if not config.enabled:
            raise ValueError("this ShadowKVConfig has enabled=False: serve the model dense (shadowkv_fx.restore(model), "
                             "then DenseSlots)")
        if num_slots < 1 or max_length < 2 or prefill_chunk < 1:
            raise ValueError(f"ShadowKVSlots needs num_slots >= 1, max_length >= 2 and prefill_chunk >= 1, got "
                             f"{num_slots}, {max_length} and {prefill_chunk}")
        if runtime.max_positions is not None and max_length > runtime.max_positions:
            raise ValueError(f"max_length={max_length} is past the model's context (max_position_embeddings="
                             f"{runtime.max_positions}): use max_length <= {runtime.max_positions}")
        if prefix_store is not None and not isinstance(prefix_store, PrefixStore):
            raise TypeError(f"prefix_store must be a shadowkv_fx.serving.PrefixStore or None, got "
                            f"{type(prefix_store).__name__}")
        self.model = model
        self.num_slots, self.max_length, self.prefill_chunk = num_slots, max_length, prefill_chunk
        self.config = config
        self.device = next(model.parameters()).device
        on_gpu = self.device.type == "cuda" and config.value_hbm_gib is not None
        room = int(config.value_hbm_gib * 2**30) if on_gpu else 0
        self.cache = SlotCache(runtime.num_layers, config, num_slots, max_length, tail_capacity, room)
        self._claimed = [False] * num_slots  # prefilling or decoding
        self._warned_short = False
        self.prefix_store = prefix_store
        # host seconds the serving loop spent per admission phase (no device sync: the loop's own
        # time, which every running row waits for): "lookup" (a stored document's copy), "document"
        # (prefill pieces), "question" (a question's steps on the copy), "adopt" (the row joining a slot)
        self.host_seconds: Counter[str] = Counter()

    def occupied_slots(self) -> list[int]:
        return [slot for slot, claimed in enumerate(self._claimed) if claimed]

    def prefill(self, slot: int, prompt_ids: torch.Tensor, prefix_len: int | None = None
                ) -> Iterator[torch.Tensor | None]:
        """``prefix_len``: the prompt's first ``prefix_len`` tokens are a document (``prefix_store``):
        it is prefilled alone (or found stored), the rest asked of it as the recipe asks a question."""
        if self._claimed[slot]:
            raise RuntimeError(f"slot {slot} still holds a request; release it before prefilling into it")
        n = prompt_ids.numel()
        if not 0 < n < self.max_length:
            raise ValueError(f"a prompt of {n} tokens does not fit a slot of max_length {self.max_length}")
        check_prefix_len(prefix_len, n)
        with self._timed("lookup"):
            hit = None if self.prefix_store is None else self.prefix_store.lookup(prompt_ids, prefix_len)
        doc, alone = (prefix_len, None) if hit is None else (hit[0], self._checked(hit[1]))
        if (doc or n) < self.config.min_sparse_prompt and not self._warned_short:
            self._warned_short = True
            log.warning("prompts shorter than %d tokens are not compressed and decode densely (said once)",
                        self.config.min_sparse_prompt)
        self._claimed[slot] = True  # claimed now, so a release() mid-prefill frees it
        ids = prompt_ids.to(self.device)[None]
        if alone is None:
            alone = ShadowKVCache(len(self.cache.layers), self.config, prefill_chunk_size=self.prefill_chunk,
                                  tail_capacity=self.max_length - n if doc is None else self._document_tail(doc))
            alone.warn_short_prompts = False
            pieces = self.model._shadowkv.prefill_pieces(alone, ids[:, :doc])
            try:
                while True:
                    with self._timed("document"):
                        logits = next(pieces)  # None after each piece but the last, then the last one's logits
                    if logits is not None:
                        break
                    yield None
            finally:
                pieces.close()  # cancelled between pieces: the batch-1 cache is rolled back and dropped
            if doc is not None:
                if self.prefix_store is not None and self.prefix_store.put(prompt_ids[:doc], alone):
                    alone = copy.deepcopy(alone)  # the stored one is never asked anything
                yield None  # the document's last piece ran in this step: the question's first runs in the next
        if doc is not None:
            logits = yield from self._ask(alone, ids, doc)
        with self._timed("adopt"), torch.no_grad():
            self.cache.adopt(slot, alone)
        yield logits

    def _ask(self, alone: ShadowKVCache, ids: torch.Tensor, doc: int) -> Generator[None, None, torch.Tensor]:
        """The recipe's question: ``ids [1, n]`` past the document's ``doc`` tokens through the model on
        ``alone`` (its dense tail), ``prefill_chunk`` tokens a step; returns the last one's logits."""
        n = ids.shape[1]
        for start in range(doc, n, self.prefill_chunk):
            if start > doc:
                yield None
            # per call, not across the yield: grad mode is the caller's between pieces
            with self._timed("question"), torch.no_grad():
                out = self.model(input_ids=ids[:, start : start + self.prefill_chunk],
                                 **{compat.CACHE_ARG: alone}, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1]

    @contextlib.contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        """Add the block's host seconds to ``host_seconds[phase]`` (no device sync)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.host_seconds[phase] += time.perf_counter() - start

    def _document_tail(self, doc: int) -> int:
        """Tail room of a document's cache: a running row's (with folding: what a question decodes in
        before it folds, which copies the store for the question anyway); more would stay allocated
        in every stored document. A longer question grows its copy's tail, never the stored one."""
        return max(1, min(self.max_length - doc, self.cache.sizes.tail))

    def _checked(self, stored: ShadowKVCache) -> ShadowKVCache:
        source = stored.source_model() if stored.source_model is not None else None
        if stored.config != self.config or len(stored.layers) != len(self.cache.layers) or source not in (
                None, self.model):
            raise ValueError("the prefix store's cache of this document was prefilled by another model or with "
                             "another ShadowKVConfig than these slots': give each ShadowKVSlots a PrefixStore of "
                             "its own")
        return stored

    def decode(self, tokens: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        for slot, (on, live) in enumerate(zip(active.tolist(), self.cache.live)):
            if on and not live:
                raise RuntimeError(f"decode of slot {slot}, which holds no prefilled request")
            if live and not on:
                raise RuntimeError(f"slot {slot} holds a prefilled request but is left out of the step: ShadowKVSlots "
                                   "decodes every prefilled slot in each step until it is released")
        full = [b for b, p in enumerate(self.cache.row_positions()) if self.cache.live[b] and p >= self.max_length]
        if full:
            raise RuntimeError(f"slot {full[0]} is full ({self.max_length} positions)")
        with torch.no_grad():
            out = self.model(input_ids=tokens.to(self.device)[:, None], **{compat.CACHE_ARG: self.cache},
                             use_cache=True)
        return out.logits[:, -1]

    def release(self, slot: int) -> None:
        self._claimed[slot] = False
        if self.cache.live[slot]:
            self.cache.release(slot)
