"""Compress once, ask many, in continuous batching (issue #31): a store of prefilled documents.

```python
store = PrefixStore(max_bytes=8 * 2**30)                 # device + host bytes of the stored caches
slots = ShadowKVSlots(model, num_slots=8, max_length=32768, prefix_store=store)
with ServingManager(slots) as manager:
    a = manager.add_request(doc + question_1, prefix_len=len(doc), max_new_tokens=64)  # miss: doc stored
    b = manager.add_request(doc + question_2, max_new_tokens=64)  # starts with a stored doc: a hit
# or: generate_batch(model, [doc + q for q in questions], prefix_lens=[len(doc)] * len(questions))
```

A request may say where its document ends (``prefix_len``); one that does not is matched against
the store anyway: the longest stored document its prompt starts with, leaving at least one token
after it. On a hit the request starts from a copy of the document's prefilled cache and prefills
only the rest of its prompt. On a miss with ``prefix_len`` the document is prefilled alone, in
pieces, stored, and the request goes on as a hit; without ``prefix_len`` the prompt is prefilled
whole, as before. Entries are keyed by the document's exact token ids (a hash of their int64 bytes
finds the candidates, the ids are then compared: a collision never gives another document's
state), bounded by ``max_bytes`` of device + host memory (``cache_share.distinct_bytes``), least
recently used out. A document larger than the bound alone is served but not kept (logged once).

Where the question goes: appended to the document's dense tail, as transformers' prompt-reuse
recipe does (prefill the document into a cache, ``generate()`` document + question on
``copy.deepcopy`` of it), not compressed with the document. Why: compressing is a property of the
whole prompt (one rank-r SVD basis over all its keys, outliers ranked over all its chunks), so a
document compressed with each question would be compressed again per question, which is what a
store is there to avoid; the stored state stays exactly the document's, shared by every copy. The
question, what the answer attends to most, stays dense and exact; a long one folds into the copy's
store chunk by chunk as generated tokens do (``fold.py``; the shared store is copied first, never
written), so it is bounded like an answer. And every answer is the recipe's answer: at full budget
and rank dense ``generate()`` of document + question, at sparse settings ShadowKV's recipe alone.
The cost: a question runs as decode steps of up to ``prefill_chunk`` tokens, each token selecting
its own chunks, where a fresh prompt would be a dense prefill; small beside the document's prefill
it saves. A request without ``prefix_len`` whose prompt happens to start with a stored document is
split there: at sparse settings its answer is then the recipe's for that split, not the
whole-prompt compression's (equal at full budget and rank).

The store never changes a stored cache: ``lookup`` hands out a copy (``cache_share.copy_cache``:
it shares the store and values, owns its decode buffers; a fold copies the shared part first), so
no caller can ask the stored one by mistake. The copy, question in its tail, then joins a slot
(``slot_state.adopt_row``): the row takes the tail's tokens into its own tail slots, ending at the
running cache's one fill level, and counts them as generated, so it positions and folds them as
the copy alone would. Where the fill is lower than the question (the first admission, or after
compaction), every row's tail first moves up (``fold.open_tail``), in place: a captured decode
step stays valid unless the tail must grow (then it is captured again, as when a row outgrows it).

Choices: ``prefix_len`` names exactly one document (the request's own split is honoured; the
longest stored match is only for requests that do not say); a stored document gets the tail room
of a running row, not room for any question (that room would stay allocated in every entry; a
longer question grows its copy's tail). ``generate_batch(prefix_lens=...)`` of an optimized model
keeps its documents for the call (an unbounded store, unless one is passed); ``DenseSlots`` takes
``prefix_len`` and changes nothing (exact attention does not depend on the split).
"""
from __future__ import annotations

import copy
import hashlib
import logging
import threading
from collections import OrderedDict
from typing import NamedTuple

import torch

from shadowkv_fx.cache import ShadowKVCache
from shadowkv_fx.cache_share import distinct_bytes

log = logging.getLogger(__name__)


class _Entry(NamedTuple):
    ids: torch.Tensor  # [n] int64, CPU: the document
    cache: ShadowKVCache  # batch 1, prefilled with the document, nothing past it
    nbytes: int


def _key(ids: torch.Tensor) -> tuple[int, bytes]:
    return ids.numel(), hashlib.blake2b(ids.numpy().tobytes(), digest_size=16).digest()


def check_prefix_len(prefix_len, tokens: int, who: str = "") -> None:
    """``ValueError`` unless ``prefix_len`` is None (no document) or an int that leaves a token of the
    ``tokens``-token prompt on each side of the document's end; ``who`` starts the message."""
    if prefix_len is not None and (isinstance(prefix_len, bool) or not isinstance(prefix_len, int)
                                   or not 0 < prefix_len < tokens):
        raise ValueError(f"{who}prefix_len={prefix_len!r} must leave a token of the {tokens}-token prompt on each side "
                         f"of the document's end: an int, 1 <= prefix_len <= {tokens - 1} (or None: no document)")


def _ids(token_ids, what: str) -> torch.Tensor:
    ids = torch.as_tensor(token_ids).detach().cpu()
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"{what} must be one sequence of token ids (a list of ints or a 1-D integer tensor), got "
                        f"{ids.dtype} of shape {tuple(ids.shape)}")
    return ids.to(torch.long).contiguous()


class PrefixStore:
    """Prefilled documents (batch-1 ``ShadowKVCache``s) by their token ids, within ``max_bytes``
    (``None``: no bound). Safe to use from several threads."""

    def __init__(self, max_bytes: int | None):
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0):
            raise ValueError(f"max_bytes must be an int >= 0 (bytes of device + host memory) or None, "
                             f"got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, bytes], _Entry] = OrderedDict()  # least recently used first
        self._lock = threading.RLock()  # put measures nbytes under it
        self._warned_large = False
        self.hits = self.misses = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Device + host bytes the stored caches hold."""
        with self._lock:
            return sum(entry.nbytes for entry in self._entries.values())

    def documents(self) -> list[list[int]]:
        """The stored documents' token ids, least recently used first."""
        with self._lock:
            return [entry.ids.tolist() for entry in self._entries.values()]

    def stored(self, doc_ids) -> ShadowKVCache | None:
        """The stored cache of exactly ``doc_ids`` itself, to inspect (never to ask: ``lookup``), or None;
        not a use (the LRU order stays)."""
        ids = _ids(doc_ids, "doc_ids")
        with self._lock:
            entry = self._entries.get(_key(ids))
        return entry.cache if entry is not None and torch.equal(entry.ids, ids) else None

    def lookup(self, prompt_ids, prefix_len: int | None = None) -> tuple[int, ShadowKVCache] | None:
        """``(n, cache)``: the longest stored document that ``prompt_ids`` starts with and leaves at
        least one token after (with ``prefix_len``: only the document ``prompt_ids[:prefix_len]``),
        its length and a copy of its cache to ask the rest on (``copy.deepcopy``: the stored one
        never changes); None when there is none. A hit makes the entry the most recently used."""
        prompt = _ids(prompt_ids, "prompt_ids")
        check_prefix_len(prefix_len, prompt.numel())
        with self._lock:
            lengths = {n for n, _ in self._entries} if prefix_len is None else {prefix_len}
            for n in sorted((n for n in lengths if n < prompt.numel()), reverse=True):
                key = _key(prompt[:n])
                entry = self._entries.get(key)
                if entry is not None and torch.equal(entry.ids, prompt[:n]):
                    self._entries.move_to_end(key)
                    self.hits += 1
                    cache = entry.cache
                    break
            else:
                self.misses += 1
                return None
        return n, copy.deepcopy(cache)

    def put(self, doc_ids, cache: ShadowKVCache) -> bool:
        """Keep ``cache``, a batch-1 ``ShadowKVCache`` just prefilled with ``doc_ids`` and nothing
        after, evicting the least recently used entries until it fits. False when it alone is over
        ``max_bytes`` (not kept). The store owns ``cache`` from now on: ask it through ``lookup``."""
        ids = _ids(doc_ids, "doc_ids")
        if not isinstance(cache, ShadowKVCache) or cache.layout is None or len(cache.layout.lengths) != 1:
            raise ValueError("put takes a batch-1 ShadowKVCache prefilled with the document (model(doc_ids, "
                             "past_key_values=cache)); prefill each document into a cache of its own")
        if cache.layout.lengths[0] != ids.numel() or cache.seq_length != ids.numel():
            raise ValueError(f"the cache holds {cache.seq_length} tokens (a prompt of {cache.layout.lengths[0]}), the "
                             f"document {ids.numel()}: put a cache right after its document's prefill, before any "
                             "question or generation")
        totals = distinct_bytes([cache])
        nbytes = totals["device"] + totals["host"]
        with self._lock:
            if self.max_bytes is not None and nbytes > self.max_bytes:
                if not self._warned_large:
                    self._warned_large = True
                    log.warning("a document's cache of %d bytes is over the prefix store's max_bytes=%d: such "
                                "documents are served but not kept (said once)", nbytes, self.max_bytes)
                return False
            key = _key(ids)
            self._entries.pop(key, None)
            while self._entries and self.max_bytes is not None and self.nbytes + nbytes > self.max_bytes:
                self._entries.popitem(last=False)
            self._entries[key] = _Entry(ids, cache, nbytes)
        return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
