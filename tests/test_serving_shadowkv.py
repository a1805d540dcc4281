"""Continuous batching on ShadowKV (issue #25): ``ShadowKVSlots`` prefills each prompt alone and
adopts it into a row of one running ``SlotCache``; every request gets the tokens ``generate()`` of
it alone gives, whatever arrives when, and the running state never moves.

One optimized model for the module (compiling costs seconds; the graph does not depend on the
ShadowKV settings, so each test passes its own ``config`` to the slots and to the caches of
``generate()`` alone), and dynamo's caches are reset for the module only.
"""
import dataclasses
import functools
import gc
import warnings

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import shadowkv_fx
from shadowkv_fx.cache import ShadowKVCache
from shadowkv_fx.serving import (CANCELLED, RequestStatus, ServingManager, ShadowKVSlots, SlotScheduler,
                                 generate_batch)
from shadowkv_fx.serving.requests import new_request
from tests.models import (_dynamo_reset_for_the_module, _fresh_dynamo, assert_close, cuda_only,  # noqa: F401
                          full_rank, tiny_pair)

VOCAB = 96
CHUNK, LOCAL, OUTLIERS = 4, 2, 2
MIN_SPARSE = (LOCAL + OUTLIERS + 1) * CHUNK
MAX_LENGTH = 80


def no_zero_query(*models):
    """Give the pad token (0) an embedding like any other token's. Its embedding is zero at init,
    so its query is zero and every chunk scores the same after it: which ones a step then selects
    is the top-k's tie-break, which differs between a store of 14 chunks (generate() alone) and one
    of 20 (a slot of a longer max_length). Real tokens never have a zero query."""
    row = torch.randn(models[0].config.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.02
    for model in models:
        with torch.no_grad():
            model.get_input_embeddings().weight[0] = row
    return models


@functools.cache
def shared():
    """A dense model and its optimized twin (peaked: a wrong key or position changes the tokens)."""
    dense, model = no_zero_query(*tiny_pair("llama", peaked=True))
    return dense, shadowkv_fx.optimize(model, full_config(model, fold_chunks=1))


def full_config(model, **kwargs) -> shadowkv_fx.ShadowKVConfig:
    """Full budget and rank: ShadowKV computes what dense attention does."""
    return shadowkv_fx.ShadowKVConfig(sparse_budget=4096, rank=full_rank(model), chunk_size=CHUNK, local_chunks=LOCAL,
                                      outlier_chunks=OUTLIERS, **kwargs)


def sparse_config(**kwargs) -> shadowkv_fx.ShadowKVConfig:
    """Two chunks selected per head from a rank-6 store: lossy, and selection matters."""
    return shadowkv_fx.ShadowKVConfig(sparse_budget=2 * CHUNK, rank=6, chunk_size=CHUNK, local_chunks=LOCAL,
                                      outlier_chunks=OUTLIERS, **kwargs)


def prompt_of(length, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (length,), generator=g).tolist()  # never pad/bos/eos


_alone = {}


def alone(model, prompt, max_new_tokens, config=None):
    """The new tokens of a plain greedy ``generate()`` of ``prompt`` by itself (a ShadowKV model:
    into a fresh cache of ``config``, as generate() would make one)."""
    key = (id(model), tuple(prompt), max_new_tokens, config)
    if key not in _alone:
        kwargs = {} if config is None else {"cache": ShadowKVCache(model.config.num_hidden_layers, config,
                                                                   max_new_tokens)}
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt], device=model.device), max_new_tokens=max_new_tokens,
                                 do_sample=False, **kwargs)
        _alone[key] = out[0, len(prompt):].tolist()
    return _alone[key]


def serve(slots, prompts, max_new, arrivals, prefix_lens=None):
    """Run the scheduler over ``slots``, request i submitted at step ``arrivals[i]`` (saying its
    document ends at ``prefix_lens[i]``; None: it does not say); outputs by index."""
    model = slots.model
    scheduler = SlotScheduler(slots)
    prefix_lens = prefix_lens or [None] * len(prompts)
    requests = [new_request(model, f"r{i}", p, max_new_tokens=m, do_sample=False, prefix_len=k)
                for i, (p, m, k) in enumerate(zip(prompts, max_new, prefix_lens))]
    pending = sorted(zip(arrivals, range(len(requests))))
    outputs, step = {}, 0
    while pending or scheduler.has_work:
        while pending and pending[0][0] <= step:
            scheduler.submit(requests[pending.pop(0)[1]])
        for event in scheduler.step():
            if event.output is not None:
                outputs[int(event.request_id[1:])] = event.output
        step += 1
    assert slots.occupied_slots() == [] and not any(slots.cache.live)
    return outputs


@st.composite
def workloads(draw):
    n = draw(st.integers(2, 5))
    return dict(lengths=draw(st.lists(st.integers(1, 56), min_size=n, max_size=n)),
                max_new=draw(st.lists(st.integers(1, 24), min_size=n, max_size=n)),
                arrivals=draw(st.lists(st.integers(0, 8), min_size=n, max_size=n)),
                num_slots=draw(st.integers(1, n - 1)), chunk=draw(st.integers(3, 64)),
                fold=draw(st.sampled_from([1, None])), seed=draw(st.integers(0, 2**16)))


# a prompt too short to compress (dense row) beside compressed ones, one slot reused by all, pieces of 5
@example(dict(lengths=[47, 9, 33], max_new=[12, 10, 6], arrivals=[0, 1, 1], num_slots=1, chunk=5, fold=1, seed=0))
# two slots: rows join while others decode and fold, so their tails start at different slots
@example(dict(lengths=[56, 23, 41, 3], max_new=[24, 20, 9, 12], arrivals=[0, 0, 3, 4], num_slots=2, chunk=16,
              fold=1, seed=1))
@settings(max_examples=4, deadline=None)
@given(workloads())
def test_full_budget_and_rank_tokens_equal_dense_generate_alone(w):
    dense, model = shared()
    prompts = [prompt_of(n, w["seed"] + i) for i, n in enumerate(w["lengths"])]
    slots = ShadowKVSlots(model, w["num_slots"], MAX_LENGTH, prefill_chunk=w["chunk"],
                          config=full_config(model, fold_chunks=w["fold"]))
    outputs = serve(slots, prompts, w["max_new"], w["arrivals"])
    for i, (p, m) in enumerate(zip(prompts, w["max_new"])):
        assert outputs[i].status == RequestStatus.FINISHED
        assert outputs[i].generated_tokens == alone(dense, p, m), f"request {i} ({len(p)} tokens)"
    state = slots.cache.layers[0].state
    assert state.compressed and slots.cache.allocated


class LogitRecorder(ShadowKVSlots):
    """ShadowKVSlots that keeps, per prompt, the logits each of its tokens was chosen from."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows, self.logits = {}, {}

    def prefill(self, slot, prompt_ids):
        for out in super().prefill(slot, prompt_ids):
            if out is not None:
                self.rows[slot] = (tuple(prompt_ids.tolist()), [out])
            yield out

    def decode(self, tokens, active):
        logits = super().decode(tokens, active)
        for slot in active.nonzero().flatten().tolist():
            self.rows[slot][1].append(logits[slot])
        return logits

    def release(self, slot):
        super().release(slot)
        if slot in self.rows:
            prompt, logits = self.rows.pop(slot)
            self.logits[prompt] = torch.stack(logits)


# the pad token generated: its query was zero, every chunk tied, before ``no_zero_query``
@example(w=dict(lengths=[48, 1, 1, 1, 1], max_new=[6, 1, 1, 1, 1], arrivals=[0] * 5, num_slots=1, chunk=3, fold=1,
                seed=343), reuse=False)
@example(w=dict(lengths=[1, 1, 1, 54], max_new=[1, 1, 1, 2], arrivals=[0] * 4, num_slots=1, chunk=3, fold=1,
                seed=326), reuse=False)
@example(w=dict(lengths=[47, 9, 33], max_new=[12, 10, 6], arrivals=[0, 1, 1], num_slots=1, chunk=5, fold=1, seed=0),
         reuse=True)
@example(w=dict(lengths=[56, 23, 41, 3], max_new=[24, 20, 9, 12], arrivals=[0, 0, 3, 4], num_slots=2, chunk=16,
                fold=None, seed=1), reuse=False)
@settings(max_examples=4, deadline=None)
@given(w=workloads(), reuse=st.booleans())
def test_sparse_tokens_and_logits_equal_shadowkv_generate_alone(w, reuse):
    """Lossy settings: each request selects, rebuilds and folds what it would alone, so it gets
    the tokens generate() of it alone gives, from the same logits up to float rounding (the slots
    lay its keys out in other buffers and batch it with other rows)."""
    _, model = shared()
    config = sparse_config(fold_chunks=w["fold"], reuse_values=reuse)
    prompts = [prompt_of(n, w["seed"] + i) for i, n in enumerate(w["lengths"])]
    prompts = [p if p not in prompts[:i] else p + [3] for i, p in enumerate(prompts)]  # the recorder keys by prompt
    slots = LogitRecorder(model, w["num_slots"], MAX_LENGTH, prefill_chunk=w["chunk"], config=config)
    outputs = serve(slots, prompts, w["max_new"], w["arrivals"])
    for i, (p, m) in enumerate(zip(prompts, w["max_new"])):
        cache = ShadowKVCache(model.config.num_hidden_layers, config, m)
        with torch.no_grad():
            expected = model.generate(torch.tensor([p]), max_new_tokens=m, do_sample=False, cache=cache,
                                      output_logits=True, return_dict_in_generate=True)
        assert outputs[i].generated_tokens == expected.sequences[0, len(p):].tolist(), f"request {i}"
        assert_close(slots.logits[tuple(p)], torch.cat(expected.logits), atol=1e-5, rtol=1e-5,
                     what=f"request {i} ({len(p)} tokens)")


def held_tensors(cache):
    """Every tensor a captured decode step holds by address (LayerState's list), per layer."""
    names = ("k_buf", "v_buf", "key_valid", "pre_k", "tail_fill", "tail_first", "gen_count", "u", "sv", "landmarks",
             "selectable", "v_chunks", "pad", "prev_idx", "v_lookups", "row_columns")
    return [[getattr(layer.state, name) for name in names] + list(layer.state.rope_tables) for layer in cache.layers]


def test_admissions_and_releases_never_move_the_running_state():
    _, model = shared()
    config = sparse_config(fold_chunks=1)
    slots = ShadowKVSlots(model, 2, MAX_LENGTH, prefill_chunk=8, config=config)
    prompts = [prompt_of(n, 40 + n) for n in (50, 31, 7, 44, 22, 58)]
    scheduler = SlotScheduler(slots)
    for i, p in enumerate(prompts):
        scheduler.submit(new_request(model, f"r{i}", p, max_new_tokens=14, do_sample=False))
    while not slots.cache.allocated:
        scheduler.step()
    report, state = slots.cache.memory_report(), slots.cache.layers[0].state
    _, hkv, _, d = state.k_buf.shape
    dense_bytes = 2 * sum(slots.cache.row_positions()) * hkv * d * state.k_buf.element_size() * len(slots.cache.layers)
    assert report["dense"]["kv"] == dense_bytes > 0 and report["cpu"]["U"] == state.u.nbytes * len(slots.cache.layers)
    held = held_tensors(slots.cache)
    assert all(t is not None for layer in held for t in layer), "every held tensor exists from the first admission"
    before = [[t.data_ptr() for t in layer] for layer in held]
    slots.cache.decode_graphs[("marker",)] = "captured"  # what a captured step would be
    outputs = {}
    while scheduler.has_work:
        outputs.update({e.request_id: e.output for e in scheduler.step() if e.output is not None})
    state = slots.cache.layers[0].state
    assert state.tail_len > 3 * 14 and state.tail_shift > 0 and max(state.tail_origin) > 0
    assert [[t.data_ptr() for t in layer] for layer in held_tensors(slots.cache)] == before
    assert ("marker",) in slots.cache.decode_graphs, "no admission, fold or release dropped the captured step"
    for i, p in enumerate(prompts):
        assert outputs[f"r{i}"].generated_tokens == alone(model, p, 14, config), f"r{i}"


def test_many_more_steps_than_the_tail_holds_across_many_admissions():
    """The shared tail fill grows every step; folds and compaction keep it within the fold window
    while every row folds, and rows that never fold grow it rarely (doubling)."""
    _, model = shared()
    config = sparse_config(fold_chunks=1)
    slots = ShadowKVSlots(model, 3, MAX_LENGTH, prefill_chunk=32, config=config)
    state = slots.cache.layers[0].state
    compressed = [prompt_of(MIN_SPARSE + (7 * i) % 36, 300 + i) for i in range(12)]
    max_new = [20 + i % 5 for i in range(12)]  # past the local window: generated tokens fold too
    outputs = serve(slots, compressed, max_new, [2 * i for i in range(12)])
    for i, (p, m) in enumerate(zip(compressed, max_new)):
        assert outputs[i].generated_tokens == alone(model, p, m, config), f"compressed request {i}"
    capacity = state.k_buf.shape[2] - state.tail_start
    assert capacity == config.fold_window + 1 and state.tail_len > 4 * capacity, (capacity, state.tail_len)
    assert int(state.tail_fill) <= capacity and state.tail_shift >= state.tail_len - capacity
    # short prompts decode densely and never fold: they alone grow the tail, by doubling
    short = [prompt_of(3 + i, 400 + i) for i in range(6)]
    max_new = [70] * 2 + [12] * 4
    outputs = serve(slots, short, max_new, [0, 5, 10, 15, 20, 25])
    grown = state.k_buf.shape[2] - state.tail_start
    assert capacity < grown < 2 * MAX_LENGTH
    for i, (p, m) in enumerate(zip(short, max_new)):
        assert outputs[i].generated_tokens == alone(model, p, m, config), f"short request {i}"


def _live_tensors():
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on torch.distributed's deprecated aliases warns
        warnings.simplefilter("ignore", FutureWarning)
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def test_cancel_mid_prefill_and_200_requests_leave_nothing_behind():
    _, model = shared()
    with ServingManager(model, num_slots=3, max_length=40, prefill_chunk=6) as manager:
        assert isinstance(manager.backend, ShadowKVSlots), "a ServingManager of an optimized model serves ShadowKV"

        def run(first, count):
            ids = [manager.add_request(prompt_of(1 + (5 * i) % 30, i), max_new_tokens=1 + i % 4, do_sample=i % 2 == 0)
                   for i in range(first, first + count)]
            for rid in ids[1::3]:  # long prompts take several pieces: many of these are cancelled mid-prefill
                manager.cancel_request(rid)
            return [manager.get_result(rid, timeout=60) for rid in ids]

        run(0, 20)
        baseline = _live_tensors()
        outputs = run(20, 200)
        after = _live_tensors()
    assert all(out is not None and out.is_finished() for out in outputs)
    assert sum(out.error == CANCELLED for out in outputs) >= 30
    assert after <= baseline, f"{after - baseline} more live tensors after 200 more requests"
    assert manager.backend.occupied_slots() == [] and not any(manager.backend.cache.live)


def test_generate_batch_of_an_optimized_model_serves_shadowkv_with_own_seeds():
    dense, model = shared()
    prompts = [prompt_of(n, 500 + n) for n in (30, 4, 52)]
    seeds = [7, 8, 9]
    sampling = dict(do_sample=True, temperature=0.8, top_k=20)
    results = model.generate_batch(prompts, max_new_tokens=6, seeds=seeds, num_slots=2, prefill_chunk=9, **sampling)
    assert list(results) == ["req_0", "req_1", "req_2"]
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        torch.manual_seed(seed)
        with torch.no_grad():
            expected = dense.generate(torch.tensor([prompt]), max_new_tokens=6, **sampling)[0, len(prompt):].tolist()
        assert results[f"req_{i}"].generated_tokens == expected, f"req_{i}"
    greedy = generate_batch(model, prompts, max_new_tokens=5, do_sample=False, num_slots=1)
    assert [out.generated_tokens for out in greedy.values()] == [alone(dense, p, 5) for p in prompts]


def test_a_prefilled_slot_left_out_of_a_step_or_a_dense_model_is_refused():
    dense, model = shared()
    slots = ShadowKVSlots(model, 2, MAX_LENGTH, config=sparse_config())
    logits = list(slots.prefill(1, torch.tensor(prompt_of(30, 0))))[-1]
    assert logits.shape == (VOCAB,) and slots.cache.live == [False, True]
    tokens = torch.tensor([0, int(logits.argmax())])
    with pytest.raises(RuntimeError, match="left out of the step"):
        slots.decode(tokens, torch.tensor([False, False]))
    with pytest.raises(RuntimeError, match="holds no prefilled request"):
        slots.decode(tokens, torch.tensor([True, True]))
    assert slots.decode(tokens, torch.tensor([False, True])).shape == (2, VOCAB)
    slots.release(1)
    with pytest.raises(ValueError, match="optimize"):
        ShadowKVSlots(dense, 1, MAX_LENGTH)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ShadowKVSlots(model, 1, 10**6)
    with pytest.raises(TypeError, match="needs max_length"):
        ServingManager(model)
    with pytest.raises(TypeError, match="has its own"):
        ServingManager(slots, max_length=MAX_LENGTH)


def test_restore_removes_generate_batch_and_deepcopy_keeps_it():
    import copy

    _, model = tiny_pair("llama")
    shadowkv_fx.optimize(model, sparse_config())
    twin = copy.deepcopy(model)
    assert "generate_batch" in vars(model) and "generate_batch" in vars(twin)
    shadowkv_fx.restore(model)
    assert "generate_batch" not in vars(model), "the model's own generate_batch again"


@cuda_only
def test_the_decode_step_stays_one_captured_cuda_graph_across_admissions(monkeypatch):
    from shadowkv_fx import cuda_graph

    _, model = no_zero_query(*tiny_pair("llama", peaked=True, seed=4))
    model = model.cuda()
    config = dataclasses.replace(sparse_config(fold_chunks=1), value_hbm_gib=0)
    shadowkv_fx.optimize(model, config, cuda_graphs=True)
    replays = []
    real_replay = cuda_graph.DecodeGraph.replay
    monkeypatch.setattr(cuda_graph.DecodeGraph, "replay", lambda self, *a: replays.append(self) or real_replay(self, *a))
    slots = ShadowKVSlots(model, 2, MAX_LENGTH, prefill_chunk=16, tail_capacity=MAX_LENGTH)
    prompts = [prompt_of(n, 700 + n) for n in (50, 31, 44, 26, 58, 37)]
    outputs = serve(slots, prompts, [12] * len(prompts), [0, 0, 6, 9, 14, 20])
    graphs = list(slots.cache.decode_graphs.values())
    assert len(graphs) == 1 and isinstance(graphs[0], cuda_graph.DecodeGraph), slots.cache.decode_graphs
    assert len(set(map(id, replays))) == 1 and len(replays) > 20, "one graph, replayed across admissions"
    for i, p in enumerate(prompts):
        assert outputs[i].generated_tokens == alone(model, p, 12, config), f"r{i}"
