"""Copies of a prefilled ``ShadowKVCache`` that share its document (issue #31: compress once, ask many).

transformers' prompt-reuse recipe prefills a document into a cache once, then answers each question
on ``copy.deepcopy(cache)``. A copy of a ShadowKV cache shares, per layer, what no decode step
writes: the compressed store (``STORE``: U, SV, landmarks, which chunks are selectable, the outliers'
ids and min-cosines, the basis's fit error), the values (pinned host memory or spare HBM) and the
prompts' padding (``FIXED``). It owns what a step writes: the decode buffers (outliers | selected
chunks | local window | tail), the dense window's pre-RoPE keys, the fill counts, the value-reuse
slots, and the RoPE tables of a folding cache (decode writes the new tokens' columns there).

Several questions about one document may also go in one batch: ``batch_repeat_interleave(n)`` on
(a copy of) the document's cache gives it ``n`` rows that read the one store through views of zero
batch stride (``repeat_rows``); only what a step writes is repeated.

A fold writes the store in place. So before a fold (``own_store_before_fold``) a state whose store
another live cache, or another row, still shares takes its own copy of the shared tensors first, in
the same kind of memory (pinned host memory stays pinned): neither the document nor any other copy
ever changes under a copy. Only copies that generate past a fold point pay for it
(``ShadowKVConfig.fold_chunks``: by default after 128 tokens of question and answer).
"""
from __future__ import annotations

import copy
import weakref

import torch

from shadowkv_fx import fold
from shadowkv_fx.layer_state import LayerState
from shadowkv_fx.pinned import grown

# written by folds only: shared until a fold, then copied on write
STORE = ("u", "sv", "landmarks", "landmark_scale", "code_scale", "selectable", "v_chunks", "v_scale", "outlier_ids",
         "outlier_cos", "fit_err")
FIXED = ("pad", "outlier_valid")  # never written after prefill
# [B, ...] tensors a step or a fold writes: a row of its own each
ROWS = ("k_buf", "v_buf", "key_valid", "prev_idx", "tail_first", "pre_k", "row_columns", "_local_valid")
ROW_LISTS = ("lengths", "prompt_chunks", "chunks", "tail_first_host", "tail_origin")

# the states that share tensors, each mapped to one set of all of them (a document and its copies)
_PEERS: "weakref.WeakKeyDictionary[LayerState, weakref.WeakSet]" = weakref.WeakKeyDictionary()


def _storage(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.untyped_storage().data_ptr()


class SharedCopies:
    """``copy.deepcopy`` and ``batch_repeat_interleave`` of a ``ShadowKVCache`` (mixed into it):
    copies and rows that share the document."""

    def __deepcopy__(self, memo: dict):
        return copy_cache(self, memo)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Make this prefilled cache of one document ``repeats`` rows, one per question, all
        reading its one store and values (``repeat_rows``)."""
        repeat_rows(self, repeats)


def copy_cache(cache, memo: dict):
    """A copy of ``cache`` (a ``ShadowKVCache``) sharing its read-only state; see the module doc.

    Every other attribute is deep-copied, so the copy steps, crops and folds on its own. Captured
    decode steps hold the original's buffer addresses: the copy starts without any.
    """
    folding = any(layer.state.folds for layer in cache.layers)
    for layer in cache.layers:
        state = layer.state
        state.values_ready()  # prefill's copies of the values to the host have landed before both read them
        for t in [getattr(state, name) for name in STORE + FIXED] + ([] if folding else state.rope_tables):
            if t is not None:
                memo[id(t)] = t
        memo[id(state.config)] = state.config
    memo[id(cache.decode_graphs)] = {}
    for layer in cache.layers:
        state = layer.state
        twin = LayerState(state.config)
        memo[id(state)] = twin
        twin.adopt({name: copy.deepcopy(value, memo) for name, value in vars(state).items()})
        peers = _PEERS.get(state)
        if peers is None:
            peers = _PEERS[state] = weakref.WeakSet([state])
        peers.add(twin)
        _PEERS[twin] = peers
    new = type(cache).__new__(type(cache))
    memo[id(cache)] = new
    new.__dict__.update(copy.deepcopy(vars(cache), memo))
    for layer in new.layers:
        layer._owner = weakref.ref(new)  # deepcopy keeps a weak reference as it is: the original
    return new


def own_store_before_fold(state: LayerState) -> bool:
    """Before ``fold.fold(state)``: where a fold is due and another live state, or another row
    (``repeat_rows``), shares part of the store, copy that part for ``state``'s rows alone. True
    when a tensor moved (captured steps read the old addresses)."""
    if not state.folds:
        return False
    others = [s for s in _PEERS.get(state, ()) if s is not state]
    # repeat_rows makes every store tensor rows reading one row, and this copies them all at once: U tells
    rows_share = state.u.shape[0] > 1 and state.u.stride(0) == 0
    # a cache nobody shares (the common case) pays two lookups per layer and step, not chunks_due
    if not (others or rows_share) or not any(fold.chunks_due(state)):
        return False
    store = [(name, t) for name in STORE if (t := getattr(state, name)) is not None]
    repeated = {name for name, t in store if t.shape[0] > 1 and t.stride(0) == 0}  # rows reading one row
    theirs = {_storage(getattr(s, name)) for s in others for name in STORE} - {None}
    fresh = {name: grown(t, 0, t.shape[0]) for name, t in store if name in repeated or _storage(t) in theirs}
    state.adopt(fresh)
    return bool(fresh)


def repeat_rows(cache, repeats: int) -> None:
    """``cache.batch_repeat_interleave(repeats)``: the prefilled one-document ``cache`` (a
    ``ShadowKVCache``) becomes ``repeats`` rows, to be asked ``repeats`` questions of one length in
    one batch (document + question ids ``[repeats, S]``). The store, values and padding are views
    of the one row with a zero batch stride, on the device and on the host; the decode buffers,
    counts and fold state are repeated (each row writes its own). The RoPE tables keep their one
    row: every row's positions are the document's."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if cache.layout is None or len(cache.layout.lengths) != 1:
        raise ValueError("batch_repeat_interleave takes a prefilled cache of one document: prefill each document "
                         "into a cache of its own")
    if cache.crop_floor is not None:
        raise ValueError("batch_repeat_interleave cannot run inside a decode step; call it between steps")
    if repeats == 1:
        return
    for layer in cache.layers:
        state = layer.state
        state.values_ready()
        rows = {name: t.expand(repeats, *t.shape[1:]) for name in STORE + FIXED
                if (t := getattr(state, name)) is not None}
        rows.update({name: t.repeat(repeats, *[1] * (t.dim() - 1)) for name in ROWS
                     if (t := getattr(state, name)) is not None})
        rows.update({name: getattr(state, name) * repeats for name in ROW_LISTS})
        state.adopt(rows)
    layout = cache.layout
    cache.layout = type(layout)(layout.pad * repeats, layout.lengths * repeats, layout.chunks * repeats,
                                layout.padded_len)
    cache.decode_graphs.clear()
    cache.fold_undo = []


def _tensors(state: LayerState) -> list[tuple[str, torch.Tensor]]:
    found = [(name, value) for name, value in vars(state).items() if isinstance(value, torch.Tensor)]
    return found + [("rope_tables", t) for t in state.rope_tables]


def distinct_bytes(caches: list) -> dict[str, int]:
    """Bytes the ``ShadowKVCache``s hold together, each storage counted once.

    Returns ``{"device": bytes, "host": bytes}``: ``host`` the values offloaded to host memory,
    ``device`` all the rest, on the model's device (on a CPU model both are the same RAM, split
    as a GPU would hold them, as ``memory_report.device_and_host_bytes`` does).
    """
    seen: set[int] = set()
    total = {"device": 0, "host": 0}
    for cache in caches:
        for layer in cache.layers:
            state = layer.state
            if state.k_buf is None:
                continue
            on_cpu = state.k_buf.device.type == "cpu"
            for name, t in _tensors(state):
                storage = t.untyped_storage()
                if storage.data_ptr() in seen:
                    continue
                seen.add(storage.data_ptr())
                host = t.device.type == "cpu" and (name == "v_chunks" or not on_cpu)
                total["host" if host else "device"] += storage.nbytes()
    return total


def questions_bytes(cache, questions: tuple[int, ...] = (1, 8, 32), batched: bool = False
                    ) -> dict[int, dict[str, int]]:
    """What a prefilled document ``cache`` and ``n`` copies of it (one per question, as the recipe
    makes them, before they generate) hold together, for each ``n`` of ``questions``:
    ``{n: {"device": bytes, "host": bytes}}`` (``distinct_bytes``). ``batched``: one copy of ``n``
    rows instead (``batch_repeat_interleave``). A copy's tail grows as it generates, by at most its
    ``tail_capacity`` tokens of keys and values before it doubles."""
    report = {}
    for n in questions:
        copies = [copy.deepcopy(cache) for _ in range(1 if batched else n)]
        if batched:
            copies[0].batch_repeat_interleave(n)
        report[n] = distinct_bytes([cache, *copies])
        del copies
    return report
