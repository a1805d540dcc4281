"""Compress once, ask many, in continuous batching (issue #31): ``PrefixStore`` keeps prefilled
documents; a request whose prompt starts with one is admitted from a copy of it and prefills only
its question, which joins the slot's row in the copy's dense tail (``slot_state.adopt_row``).

At full budget and rank every answer is dense ``generate()`` of document + question, however the
text is split, whatever else runs beside it; the stored state never changes; at sparse settings an
answer is ShadowKV's own recipe alone (prefill the document, ``generate()`` document + question on
a copy). The models and helpers are test_serving_shadowkv's (one compiled model for both files).
"""
import copy
import logging

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from shadowkv_fx import fold
from shadowkv_fx.cache import ShadowKVCache
from shadowkv_fx.serving import (DenseSlots, PrefixStore, RequestStatus, ServingManager, ShadowKVSlots,
                                 SlotScheduler, generate_batch, prefix_store)
from shadowkv_fx.serving.requests import new_request
from tests.models import _dynamo_reset_for_the_module, _fresh_dynamo  # noqa: F401
from tests.test_cache_reuse import assert_unchanged, snapshot
from tests.test_serving_shadowkv import (MAX_LENGTH, alone, full_config, held_tensors, prompt_of, serve, shared,
                                         sparse_config)


def prefilled(model, doc, config) -> ShadowKVCache:
    """The recipe's first half: ``doc`` into a batch-1 cache of its own."""
    cache = ShadowKVCache(model.config.num_hidden_layers, config)
    with torch.no_grad():
        model(torch.tensor([doc]), past_key_values=cache)
    return cache


@st.composite
def documents_and_questions(draw):
    doc = draw(st.integers(1, 50))
    n = draw(st.integers(1, 4))
    questions = draw(st.lists(st.integers(1, 16), min_size=n, max_size=n))
    max_new = [draw(st.integers(1, min(24, MAX_LENGTH - doc - q))) for q in questions]
    others = draw(st.lists(st.integers(1, 40), max_size=2))
    return dict(doc=doc, questions=questions, max_new=max_new, others=others,
                other_new=draw(st.lists(st.integers(1, 20), min_size=len(others), max_size=len(others))),
                says=draw(st.lists(st.booleans(), min_size=n, max_size=n)),
                arrivals=draw(st.lists(st.integers(0, 8), min_size=n + len(others), max_size=n + len(others))),
                num_slots=draw(st.integers(1, 3)), chunk=draw(st.integers(3, 32)),
                fold=draw(st.sampled_from([1, None])),
                seed=draw(st.integers(0, 2**16)))


# the first question says where the document ends; the others are found by their prompts, one of a token
@example(dict(doc=40, questions=[5, 12, 1], max_new=[20, 14, 9], others=[30], other_new=[15], says=[True, False, False],
              arrivals=[0, 2, 3, 1], num_slots=2, chunk=7, fold=1, seed=0))
# a question past the fold window in one slot; a document too short to compress; pieces of 3
@example(dict(doc=24, questions=[16, 16], max_new=[30, 8], others=[], other_new=[], says=[True, True],
              arrivals=[0, 0], num_slots=1, chunk=3, fold=1, seed=1))
@example(dict(doc=9, questions=[3, 6], max_new=[12, 12], others=[44], other_new=[6], says=[True, True],
              arrivals=[0, 1, 0], num_slots=3, chunk=32, fold=None, seed=2))
@settings(max_examples=5, deadline=None)
@given(documents_and_questions())
def test_full_budget_and_rank_every_answer_is_dense_generate_of_document_and_question(w):
    dense, model = shared()
    doc = prompt_of(w["doc"], w["seed"])
    prompts = [doc + prompt_of(q, w["seed"] + 1 + i) for i, q in enumerate(w["questions"])]
    prompts += [prompt_of(n, w["seed"] + 100 + i) for i, n in enumerate(w["others"])]
    prefix_lens = [w["doc"] if says else None for says in w["says"]] + [None] * len(w["others"])
    max_new = w["max_new"] + w["other_new"]
    store = PrefixStore(None)
    slots = ShadowKVSlots(model, w["num_slots"], MAX_LENGTH, prefill_chunk=w["chunk"],
                          config=full_config(model, fold_chunks=w["fold"]), prefix_store=store)
    outputs = serve(slots, prompts, max_new, w["arrivals"], prefix_lens)
    for i, (p, m) in enumerate(zip(prompts, max_new)):
        assert outputs[i].status == RequestStatus.FINISHED
        assert outputs[i].generated_tokens == alone(dense, p, m), f"request {i} ({len(p)} tokens)"
    said = sum(k is not None for k in prefix_lens)
    assert store.documents() == ([doc] if said else [])
    assert store.hits >= said - 1, "every question saying its document but the first to come starts from the store"


def test_the_stored_document_never_changes_while_questions_generate_past_fold_points():
    """Questions past the fold window and answers long enough to fold many times, side by side:
    each copy folds into a store of its own; the document's stored state stays bit for bit."""
    dense, model = shared()
    config = full_config(model, fold_chunks=1)
    store = PrefixStore(None)
    slots = ShadowKVSlots(model, 2, MAX_LENGTH, prefill_chunk=5, config=config, prefix_store=store)
    doc = prompt_of(36, 7)
    first = serve(slots, [doc + prompt_of(2, 8)], [3], [0], [len(doc)])
    stored = store.stored(doc)
    assert stored is not None and stored.layers[0].state.compressed and stored.layers[0].state.folds
    before = snapshot(stored)
    questions = [prompt_of(q, 20 + q) for q in (1, 14, 4, 20)]
    max_new = [MAX_LENGTH - len(doc) - len(q) for q in questions]
    outputs = serve(slots, [doc + q for q in questions], max_new, [0, 0, 3, 9], [len(doc)] * len(questions))
    assert_unchanged(before, stored)
    assert store.hits == len(questions) and store.misses == 1
    assert first[0].generated_tokens == alone(dense, doc + prompt_of(2, 8), 3)
    for i, (q, m) in enumerate(zip(questions, max_new)):
        assert outputs[i].generated_tokens == alone(dense, doc + q, m), f"question {i}"
    assert max(slots.cache.layers[0].state.chunks) > stored.layers[0].state.chunks[0]


@settings(max_examples=3, deadline=None)
@given(doc=st.integers(20, 48), questions=st.lists(st.integers(1, 14), min_size=1, max_size=3),
       chunk=st.integers(3, 24), fold=st.sampled_from([1, None]), reuse=st.booleans(), seed=st.integers(0, 2**16))
@example(doc=44, questions=[14, 1, 6], chunk=5, fold=1, reuse=False, seed=0)
@example(doc=30, questions=[9, 3], chunk=16, fold=None, reuse=True, seed=1)
def test_sparse_answers_equal_the_recipe_alone(doc, questions, chunk, fold, reuse, seed):
    """Lossy settings: a request asked of a stored document gets the tokens (and logits, to float
    rounding) of ShadowKV's recipe alone: the document prefilled into a cache, ``generate()`` of
    document + question on a copy of it."""
    _, model = shared()
    config = sparse_config(fold_chunks=fold, reuse_values=reuse)
    ids = prompt_of(doc, seed)
    prompts = [ids + prompt_of(q, seed + 1 + i) for i, q in enumerate(questions)]
    max_new = [min(16, MAX_LENGTH - len(p)) for p in prompts]
    slots = ShadowKVSlots(model, 2, MAX_LENGTH, prefill_chunk=chunk, config=config, prefix_store=PrefixStore(None))
    outputs = serve(slots, prompts, max_new, [0, 1, 1][: len(prompts)], [doc] * len(prompts))
    cache = prefilled(model, ids, config)
    for i, (p, m) in enumerate(zip(prompts, max_new)):
        with torch.no_grad():
            expected = model.generate(torch.tensor([p]), past_key_values=copy.deepcopy(cache), max_new_tokens=m,
                                      do_sample=False)
        assert outputs[i].generated_tokens == expected[0, len(p):].tolist(), f"question {i}"


def test_lru_eviction_by_bytes_longest_match_and_never_a_false_hit(monkeypatch, caplog):
    _, model = shared()
    config = sparse_config()
    docs = [prompt_of(24, 60 + i) for i in range(3)]
    caches = [prefilled(model, d, config) for d in docs]
    size = PrefixStore(None)
    assert size.put(docs[0], caches[0]) and size.nbytes > 0
    each = size.nbytes
    store = PrefixStore(2 * each + each // 2)  # room for two
    assert store.put(docs[0], caches[0]) and store.put(docs[1], caches[1])
    n, copied = store.lookup(docs[0] + [5, 6])  # a use: docs[1] is now the least recently used
    assert n == 24 and copied is not caches[0] and copied.layers[0].state.u is caches[0].layers[0].state.u
    assert store.put(docs[2], caches[2])
    assert store.documents() == [docs[0], docs[2]] and store.nbytes <= store.max_bytes
    assert store.lookup(docs[1] + [5]) is None, "evicted"
    assert store.lookup(docs[0]) is None, "a prompt that is only the document leaves no token to ask"
    # the longest stored document the prompt starts with, or exactly the one prefix_len names
    nested = PrefixStore(None)
    longer = docs[0] + prompt_of(8, 70)
    assert nested.put(docs[0], caches[0]) and nested.put(longer, prefilled(model, longer, config))
    assert nested.lookup(longer + [9])[0] == 32 and nested.lookup(longer + [9], prefix_len=24)[0] == 24
    assert nested.lookup(longer, prefix_len=30) is None and nested.lookup(longer)[0] == 24
    # every document hashes alike: the ids are compared, so no other document's state comes back
    monkeypatch.setattr(prefix_store, "_key", lambda ids: (ids.numel(), b"same"))
    colliding = PrefixStore(None)
    colliding.put(docs[0], caches[0])
    assert colliding.lookup(docs[1] + [4]) is None and colliding.lookup(docs[0] + [4])[0] == 24
    # a document over the bound alone is served but not kept, said once
    small = PrefixStore(each // 2)
    with caplog.at_level(logging.WARNING, logger=prefix_store.__name__):
        assert not small.put(docs[0], caches[0]) and not small.put(docs[1], caches[1])
    assert len(small) == 0 and sum("over the prefix store's max_bytes" in r.message for r in caplog.records) == 1


def test_a_question_longer_than_the_fill_opens_the_tail_first_admission_and_after_compaction(monkeypatch):
    """The running tail's one fill is below a joining question's length at the first admission
    (fill 0) and after compaction (a folding row keeps the fill within its window): every row's
    tail moves up first (``fold.open_tail``), growing the buffers where they are too small."""
    dense, model = shared()
    opened = []
    real = fold.open_tail
    monkeypatch.setattr(fold, "open_tail", lambda state, tokens: opened.append(
        (tokens - (state.tail_len - state.tail_shift), state.tail_shift, state.k_buf.shape[2])) or real(state, tokens))
    config = full_config(model, fold_chunks=1)
    slots = ShadowKVSlots(model, 2, MAX_LENGTH, prefill_chunk=32, config=config, tail_capacity=4,
                          prefix_store=PrefixStore(None))
    # a document too short to compress: its question stays whole in the tail (a compressed one may fold some)
    doc = prompt_of(9, 80)
    prompts = [doc + prompt_of(12, 82), prompt_of(40, 81), doc + prompt_of(18, 83)]
    max_new = [10, 36, 12]
    outputs = serve(slots, prompts, max_new, [0, 1, 30], [9, None, 9])
    for i, (p, m) in enumerate(zip(prompts, max_new)):
        assert outputs[i].generated_tokens == alone(dense, p, m), f"request {i}"
    ups = [(up, shift, width) for up, shift, width in opened if up > 0]
    assert ups[0][:2] == (12, 0), "the first admission opens the empty tail for its question"
    assert any(shift > 0 for _, shift, _ in ups[1:]), "the second question joins after compaction, above the fill"
    assert slots.cache.layers[0].state.k_buf.shape[2] > ups[0][2], "the tail grew for a question past its room"


def test_a_question_within_the_fill_moves_nothing_and_keeps_the_captured_step():
    dense, model = shared()
    config = sparse_config(fold_chunks=1)
    store = PrefixStore(None)
    slots = ShadowKVSlots(model, 2, MAX_LENGTH, prefill_chunk=8, config=config, tail_capacity=MAX_LENGTH,
                          prefix_store=store)
    doc = prompt_of(32, 90)
    serve(slots, [doc + prompt_of(3, 91)], [2], [0], [len(doc)])  # allocates, stores the document
    scheduler = SlotScheduler(slots)
    short = prompt_of(3, 92)  # never compressed, never folds: the fill only grows while it decodes
    scheduler.submit(new_request(model, "short", short, max_new_tokens=40, do_sample=False))
    for _ in range(20):
        scheduler.step()
    state = slots.cache.layers[0].state
    assert state.tail_len - state.tail_shift > 6
    before = [[t.data_ptr() for t in layer] for layer in held_tensors(slots.cache)]
    slots.cache.decode_graphs[("marker",)] = "captured"
    question = doc + prompt_of(6, 93)
    scheduler.submit(new_request(model, "q", question, max_new_tokens=12, do_sample=False))
    outputs = {}
    while scheduler.has_work:
        outputs.update({e.request_id: e.output for e in scheduler.step() if e.output is not None})
    assert ("marker",) in slots.cache.decode_graphs and store.hits >= 1
    assert [[t.data_ptr() for t in layer] for layer in held_tensors(slots.cache)] == before
    cache = prefilled(model, doc, config)
    with torch.no_grad():
        expected = model.generate(torch.tensor([question]), past_key_values=cache, max_new_tokens=12, do_sample=False)
    assert outputs["q"].generated_tokens == expected[0, len(question):].tolist()
    assert outputs["short"].generated_tokens == alone(model, short, 40, config)


def test_generate_batch_and_the_manager_take_where_documents_end():
    dense, model = shared()
    doc = prompt_of(28, 95)
    prompts = [doc + prompt_of(4, 96), prompt_of(20, 97), doc + prompt_of(9, 98)]
    results = generate_batch(model, prompts, max_new_tokens=6, do_sample=False, num_slots=2, prefill_chunk=6,
                             prefix_lens=[28, None, 28])
    assert [r.generated_tokens for r in results.values()] == [alone(dense, p, 6) for p in prompts]
    store = PrefixStore(None)
    with ServingManager(model, max_length=MAX_LENGTH, num_slots=2, prefix_store=store) as manager:
        ids = [manager.add_request(p, max_new_tokens=5, do_sample=False, prefix_len=28 if p[:28] == doc else None)
               for p in prompts]
        outputs = [manager.get_result(rid, timeout=60) for rid in ids]
    assert [out.generated_tokens for out in outputs] == [alone(dense, p, 5) for p in prompts]
    assert store.documents() == [doc] and store.hits == 1
    # the dense reference takes the same requests: a split changes nothing in exact attention
    dense_out = generate_batch(DenseSlots(dense, 2, MAX_LENGTH), prompts, max_new_tokens=6, do_sample=False,
                               prefix_lens=[28, None, 28])
    assert [r.generated_tokens for r in dense_out.values()] == [alone(dense, p, 6) for p in prompts]


class NoDocuments:
    """A slot backend from before prefix_len: prefill takes the slot and the prompt only."""

    def __init__(self, slots):
        self.slots, self.model, self.num_slots, self.max_length = slots, slots.model, slots.num_slots, slots.max_length

    def prefill(self, slot, prompt_ids):
        return self.slots.prefill(slot, prompt_ids)

    def decode(self, tokens, active):
        return self.slots.decode(tokens, active)

    def release(self, slot):
        self.slots.release(slot)


def test_misuse_gets_clear_errors_before_any_work():
    dense, model = shared()
    doc = prompt_of(30, 99)
    for bad in (0, 30 + 4, -1, True, 2.5):
        with pytest.raises(ValueError, match="prefix_len"):
            new_request(model, "r", doc + [3, 4, 5, 6], max_new_tokens=2, prefix_len=bad)
    with pytest.raises(ValueError, match="give one per prompt"):
        generate_batch(model, [doc + [3]], max_new_tokens=2, prefix_lens=[30, 30])
    slots = ShadowKVSlots(model, 1, MAX_LENGTH, config=sparse_config(), prefix_store=PrefixStore(None))
    with pytest.raises(TypeError, match="has its own"):
        generate_batch(slots, [doc + [3]], max_new_tokens=2, prefix_store=PrefixStore(None))
    with pytest.raises(TypeError, match="has its own"):
        ServingManager(slots, prefix_store=PrefixStore(None))
    with pytest.raises(TypeError, match="takes no prefix_len"):
        SlotScheduler(NoDocuments(slots)).submit(new_request(model, "r", doc + [3], max_new_tokens=2, prefix_len=30))
    with pytest.raises(TypeError, match="PrefixStore"):
        ShadowKVSlots(model, 1, MAX_LENGTH, prefix_store=1 << 20)
    with pytest.raises(ValueError, match="served dense"):
        generate_batch(dense, [doc + [3]], max_new_tokens=2, prefix_lens=[30], prefix_store=PrefixStore(None))
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="max_bytes"):
            PrefixStore(bad)
    store = PrefixStore(None)
    with pytest.raises(ValueError, match="batch-1 ShadowKVCache prefilled"):
        store.put(doc, ShadowKVCache(model.config.num_hidden_layers, sparse_config()))
    asked = prefilled(model, doc, sparse_config())
    with torch.no_grad():
        model.generate(torch.tensor([doc + [3]]), past_key_values=asked, max_new_tokens=2, do_sample=False)
    with pytest.raises(ValueError, match="before any question"):
        store.put(doc, asked)
    with pytest.raises(ValueError, match="before any question"):
        store.put(doc[:-1], prefilled(model, doc, sparse_config()))
    # a document stored under other settings than the slots' is refused, not adopted wrong
    other = PrefixStore(None)
    other.put(doc, prefilled(model, doc, full_config(model)))
    slots = ShadowKVSlots(model, 1, MAX_LENGTH, config=sparse_config(), prefix_store=other)
    with pytest.raises(ValueError, match="another ShadowKVConfig"):
        serve(slots, [doc + [3, 4]], [2], [0], [None])
