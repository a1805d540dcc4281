"""The one thing the continuous-batching scheduler needs from a KV-cache implementation: slots.

A ``SlotBackend`` holds the state of ``num_slots`` sequences side by side (one dense cache each, or
one row of a batched ShadowKV cache). The scheduler never sees that state; it only asks for three
things, always from one thread:

- ``prefill(slot, prompt_ids)``: fill a free slot with a prompt, in pieces. It is a generator: it
  yields ``None`` after each piece but the last (the scheduler runs a decode step of the other slots
  there, so a long prompt never stalls them for longer than one piece) and finally yields the logits
  of the prompt's last position ``[vocab]``. The scheduler may ``close()`` it between pieces (the
  request was cancelled) and then calls ``release(slot)``: the backend must cope with a slot left
  half-prefilled. A backend may take ``prefix_len`` too (``prefill(slot, prompt_ids, prefix_len=k)``,
  for a request that says where its document ends: ``prefix_store``); the scheduler passes it only
  for such requests, and refuses them for a backend without it (``takes_prefix_len``).
- ``decode(tokens, active)``: one step of every active slot at once, each at its own length. Static
  shapes on purpose: ``tokens [num_slots]`` and ``active [num_slots]`` are always full width, so a
  backend can run the step as one CUDA graph whatever slots come and go; it copies them into its own
  buffers. Inactive rows (free, prefilling, or finished) are not advanced and their state is left
  untouched; their logits rows are garbage. Each slot's length lives in the backend: a slot's
  position is its prompt length plus the number of decode steps it took part in since its prefill.
- ``release(slot)``: the request in the slot is over (finished, cancelled or failed). The next
  ``prefill`` into that slot overwrites it, so a backend with preallocated slot state frees nothing
  and a backend with per-slot allocations drops them here (the scheduler relies on this for flat
  memory over any number of requests).

Every request the scheduler admits satisfies ``len(prompt) + max_new_tokens <= max_length``; the last
generated token is never fed back, so a slot holds at most ``max_length - 1`` positions.

``model`` is the Hugging Face model whose ``generation_config`` supplies a request's defaults and whose
``_get_logits_processor`` builds its logits processors, exactly as ``generate()`` does.

A backend may require every prefilled slot to take part in each decode step until it is released
(``ShadowKVSlots`` does: its rows share one dense tail); the scheduler always decodes them all.
``slots_for`` picks the backend for a model: ``ShadowKVSlots`` for one optimized by
``shadowkv_fx.optimize``, else ``DenseSlots``.
"""
from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch

from shadowkv_fx.serving.dense_slots import DenseSlots
from shadowkv_fx.serving.prefix_store import PrefixStore
from shadowkv_fx.serving.shadowkv_slots import ShadowKVSlots

DEFAULT_SLOTS = 8


@runtime_checkable
class SlotBackend(Protocol):
    model: torch.nn.Module
    num_slots: int
    max_length: int

    def prefill(self, slot: int, prompt_ids: torch.Tensor) -> Iterator[torch.Tensor | None]:
        """Fill free ``slot`` with ``prompt_ids [S]`` (int64, CPU) in pieces: yields ``None`` between pieces,
        then the last position's logits ``[vocab]``."""
        ...

    def decode(self, tokens: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """``tokens [num_slots]`` int64 and ``active [num_slots]`` bool, both on the CPU -> logits
        ``[num_slots, vocab]``; rows of inactive slots are garbage and their state is untouched."""
        ...

    def release(self, slot: int) -> None:
        """The slot's request is over; the next prefill may overwrite its state."""
        ...


def is_slot_backend(obj) -> bool:
    return all(callable(getattr(obj, name, None)) for name in ("prefill", "decode", "release")) and all(
        hasattr(obj, name) for name in ("model", "num_slots", "max_length"))


def takes_prefix_len(backend) -> bool:
    """Whether ``backend.prefill`` takes a request's ``prefix_len`` (where its document ends)."""
    try:
        parameters = inspect.signature(backend.prefill).parameters
    except (TypeError, ValueError):  # no signature to read: let the call say
        return True
    return "prefix_len" in parameters or any(p.kind == p.VAR_KEYWORD for p in parameters.values())


def check_takes_prefix_len(backend, request) -> None:
    """``TypeError`` for a request that says where its document ends (``prefix_len``) when ``backend``
    cannot take it, naming the backends that can."""
    if request.prefix_len is not None and not takes_prefix_len(backend):
        raise TypeError(f"request {request.request_id} says where its document ends (prefix_len), but "
                        f"{type(backend).__name__}.prefill takes no prefix_len: leave it out, or serve it with "
                        "ShadowKVSlots (a prefix store) or DenseSlots")


def slots_for(model, num_slots: int, max_length: int, prefill_chunk: int = 512,
              prefix_store: PrefixStore | None = None) -> SlotBackend:
    """The slot backend that serves ``model``: ShadowKV rows for a model optimized by
    ``shadowkv_fx.optimize`` (its config, and ``prefix_store``), the exact dense reference otherwise."""
    if getattr(model, "_shadowkv", None) is not None:
        return ShadowKVSlots(model, num_slots, max_length, prefill_chunk, prefix_store=prefix_store)
    if prefix_store is not None:
        raise ValueError("a PrefixStore holds ShadowKV caches, and this model is served dense (DenseSlots): optimize "
                         "it with shadowkv_fx.optimize(model), or leave prefix_store out")
    return DenseSlots(model, num_slots, max_length, prefill_chunk)
