"""``generate_batch``: transformers' continuous-batching call, served by our scheduler.

``generate_batch(model_or_slots, inputs, generation_config, **kwargs)`` takes what
``model.generate_batch(inputs, generation_config, **kwargs)`` takes and returns the same thing: a
dict from request id (``req_0``, ``req_1`` ... in input order) to transformers' ``GenerationOutput``.
Given a model, it serves it with ``slots.slots_for``'s backend (``ShadowKVSlots`` for a model
optimized by ``shadowkv_fx.optimize``, else ``DenseSlots``), sized to the longest request unless
told; given a ``SlotBackend``, it uses that. Every request is checked before any model work, and runs in
the calling thread; an error in a step fails the open requests, frees their slots, and is raised.
"""
from __future__ import annotations

import torch
from tqdm import tqdm
from transformers import GenerationConfig

from shadowkv_fx.serving.prefix_store import PrefixStore
from shadowkv_fx.serving.requests import GenerationOutput, check_fits, new_request
from shadowkv_fx.serving.scheduler import SlotScheduler
from shadowkv_fx.serving.slots import DEFAULT_SLOTS, is_slot_backend, slots_for


def generate_batch(model_or_slots, inputs: list[list[int]], generation_config: GenerationConfig | None = None, *,
                   num_slots: int | None = None, max_length: int | None = None, prefill_chunk: int = 512,
                   seeds: list[int] | None = None, tokenizer=None, record_timestamps: bool = False,
                   progress_bar: bool = False, prefix_lens: list[int | None] | None = None,
                   prefix_store: PrefixStore | None = None, **generation_kwargs) -> dict[str, GenerationOutput]:
    """Generate for every prompt of ``inputs`` with continuous batching.

    ``num_slots`` / ``max_length`` / ``prefill_chunk`` size the slots built for a model
    (defaults: ``min(len(inputs), 8)`` slots, the longest request's prompt + max_new_tokens, 512).
    ``seeds[i]`` seeds request i's sampling; by default seeds are drawn from torch's global generator
    in input order, so ``torch.manual_seed`` before the call makes it repeat.
    ``prefix_lens[i]``: where prompt i's document ends (None: no document), so prompts sharing a
    document prefill it once (``prefix_store``); the slots built for an optimized model keep the
    call's documents in ``prefix_store`` (default: a store of its own, unbounded, for the call).
    """
    if not inputs:
        return {}
    given_slots = is_slot_backend(model_or_slots)
    if given_slots and (num_slots is not None or max_length is not None or prefix_store is not None):
        raise TypeError("num_slots, max_length and prefix_store make the slots generate_batch builds for a model; "
                        "a SlotBackend passed in has its own")
    model = model_or_slots.model if given_slots else model_or_slots
    for name, given in (("seeds", seeds), ("prefix_lens", prefix_lens)):
        if given is not None and len(given) != len(inputs):
            raise ValueError(f"{len(given)} {name} for {len(inputs)} prompts; give one per prompt")
    seeds = seeds if seeds is not None else [None] * len(inputs)
    prefix_lens = prefix_lens if prefix_lens is not None else [None] * len(inputs)
    requests = [new_request(model, f"req_{i}", ids, generation_config, seed, record_timestamps=record_timestamps,
                            tokenizer=tokenizer, prefix_len=prefix_len, **generation_kwargs)
                for i, (ids, seed, prefix_len) in enumerate(zip(inputs, seeds, prefix_lens))]
    if given_slots:
        slots = model_or_slots
    else:
        optimized = getattr(model, "_shadowkv", None) is not None
        if prefix_store is None and optimized and any(n is not None for n in prefix_lens):
            prefix_store = PrefixStore(None)  # the call's documents, for the call
        slots = slots_for(model, num_slots or min(len(requests), DEFAULT_SLOTS),
                          max_length or max(request.needed_length for request in requests), prefill_chunk,
                          prefix_store)
    for request in requests:  # all of them before any work
        check_fits(request, slots.max_length)

    scheduler = SlotScheduler(slots, tokenizer)
    for request in requests:
        scheduler.submit(request)
    results = {}
    with torch.no_grad(), tqdm(total=len(requests), disable=not progress_bar, unit="request") as bar:
        try:
            while scheduler.has_work:
                for event in scheduler.step():
                    if event.output is not None:
                        results[event.request_id] = event.output
                        bar.update(1)
        except BaseException as error:
            scheduler.fail_all(error)
            raise
    return {request.request_id: results[request.request_id] for request in requests}
