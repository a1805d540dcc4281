"""Continuous batching (shadowkv_fx.serving) on the exact DenseSlots backend: every request gets the
tokens generate() gives it alone, whatever arrives when, and slots are freed and reused."""
import gc
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.continuous_batching.requests import GenerationOutput

from shadowkv_fx.serving import (CANCELLED, DenseSlots, RequestStatus, ServingManager, SlotScheduler,
                                 generate_batch)
from shadowkv_fx.serving.requests import new_request
from tests.models import tiny_pair

VOCAB = 96


@pytest.fixture(scope="module")
def model():
    return tiny_pair("llama")[0]


_alone_cache = {}


def alone(model, prompt, max_new_tokens, **kwargs):
    """The new tokens of a plain generate() of ``prompt`` by itself."""
    key = (tuple(prompt), max_new_tokens, repr(sorted(kwargs.items())))
    if key not in _alone_cache:
        ids = torch.tensor([prompt])
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
        _alone_cache[key] = out[0, len(prompt):].tolist()
    return _alone_cache[key]


def prompt_of(length, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (length,), generator=g).tolist()  # never pad/bos/eos


class RecordingSlots:
    """DenseSlots that logs every prefill piece and decode step, in order."""

    def __init__(self, model, num_slots, max_length, prefill_chunk):
        self.inner = DenseSlots(model, num_slots, max_length, prefill_chunk)
        self.model, self.num_slots, self.max_length = model, num_slots, max_length
        self.log = []

    def prefill(self, slot, prompt_ids):
        for out in self.inner.prefill(slot, prompt_ids):
            self.log.append(("piece", slot))
            yield out

    def decode(self, tokens, active):
        self.log.append(("decode", tuple(active.nonzero().flatten().tolist())))
        return self.inner.decode(tokens, active)

    def release(self, slot):
        self.log.append(("release", slot))
        self.inner.release(slot)


def run_with_arrivals(scheduler, requests, arrival_steps):
    """Step ``scheduler``, submitting each request at its arrival step; the events, in order."""
    pending = sorted(zip(arrival_steps, range(len(requests))))
    events, step = [], 0
    while pending or scheduler.has_work:
        while pending and pending[0][0] <= step:
            scheduler.submit(requests[pending.pop(0)[1]])
        events += scheduler.step()
        step += 1
    return events


@st.composite
def workloads(draw):
    n = draw(st.integers(2, 5))
    return dict(
        lengths=draw(st.lists(st.integers(1, 24), min_size=n, max_size=n)),
        max_new=draw(st.lists(st.integers(1, 8), min_size=n, max_size=n)),
        arrivals=draw(st.lists(st.integers(0, 6), min_size=n, max_size=n)),
        num_slots=draw(st.integers(1, n - 1)),
        chunk=draw(st.integers(1, 9)),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=20, deadline=None)
@given(workloads())
def test_greedy_tokens_equal_generate_alone(model, w):
    prompts = [prompt_of(n, w["seed"] + i) for i, n in enumerate(w["lengths"])]
    slots = DenseSlots(model, w["num_slots"], max_length=40, prefill_chunk=w["chunk"])
    scheduler = SlotScheduler(slots)
    requests = [new_request(model, f"r{i}", p, max_new_tokens=m, do_sample=False)
                for i, (p, m) in enumerate(zip(prompts, w["max_new"]))]
    events = run_with_arrivals(scheduler, requests, w["arrivals"])
    outputs = {e.request_id: e.output for e in events if e.output is not None}
    for i, (p, m) in enumerate(zip(prompts, w["max_new"])):
        assert outputs[f"r{i}"].status == RequestStatus.FINISHED
        assert outputs[f"r{i}"].generated_tokens == alone(model, p, m), f"request r{i}"
    assert slots.occupied_slots() == [] and not scheduler.has_work


def test_generate_batch_returns_transformers_outputs_in_input_order(model):
    prompts = [prompt_of(n, 100 + n) for n in (7, 1, 19, 4, 11)]
    results = generate_batch(model, prompts, max_new_tokens=6, do_sample=False, num_slots=2, prefill_chunk=5,
                             record_timestamps=True)
    assert list(results) == [f"req_{i}" for i in range(5)]
    for prompt, (rid, out) in zip(prompts, results.items()):
        assert isinstance(out, GenerationOutput) and out.request_id == rid
        assert out.status == RequestStatus.FINISHED and out.error is None and out.is_finished()
        assert out.prompt_ids == prompt
        assert out.generated_tokens == alone(model, prompt, 6)
        assert len(out.timestamps) == len(out.generated_tokens)
        assert out.created_time <= out.lifespan[0] <= out.lifespan[1]


SAMPLING = dict(do_sample=True, temperature=0.8, top_k=30, top_p=0.9, repetition_penalty=1.3)


def test_sampled_tokens_depend_only_on_the_request_seed(model):
    prompts = [prompt_of(n, 200 + n) for n in (5, 13, 2, 9)]
    seeds = [11, 12, 13, 14]
    first = generate_batch(model, prompts, max_new_tokens=7, num_slots=3, prefill_chunk=4, seeds=seeds, **SAMPLING)
    order = [2, 0, 3, 1]
    second = generate_batch(model, [prompts[i] for i in order], max_new_tokens=7, num_slots=1, prefill_chunk=7,
                            seeds=[seeds[i] for i in order], **SAMPLING)
    second = {f"req_{i}": second[f"req_{k}"] for k, i in enumerate(order)}
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        torch.manual_seed(seed)  # generate() samples from the global generator, once per token
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=7, **SAMPLING)[0, len(prompt):].tolist()
        assert first[f"req_{i}"].generated_tokens == expected, f"req_{i} (3 slots)"
        assert second[f"req_{i}"].generated_tokens == expected, f"req_{i} (1 slot, other order)"
    assert len({tuple(out.generated_tokens) for out in first.values()}) == len(prompts)


def test_eos_ends_a_request_early_and_its_slot_is_reused(model):
    early, late = prompt_of(6, 300), prompt_of(9, 301)
    free_run = alone(model, early, 10)
    stop_at = next(i for i in range(2, 10) if free_run[i] not in free_run[:i])
    eos = free_run[stop_at]
    slots = RecordingSlots(model, num_slots=1, max_length=32, prefill_chunk=4)
    scheduler = SlotScheduler(slots)
    scheduler.submit(new_request(model, "early", early, max_new_tokens=10, do_sample=False, eos_token_id=[eos, 2]))
    scheduler.submit(new_request(model, "late", late, max_new_tokens=5, do_sample=False))
    events = run_with_arrivals(scheduler, [], [])
    outputs = {e.request_id: e.output for e in events if e.output is not None}
    assert outputs["early"].generated_tokens == free_run[:stop_at + 1]
    assert outputs["early"].generated_tokens == alone(model, early, 10, eos_token_id=[eos, 2])
    assert outputs["late"].generated_tokens == alone(model, late, 5)
    assert slots.log.count(("release", 0)) == 2
    released = slots.log.index(("release", 0))
    assert ("piece", 0) in slots.log[released:], "the second request was prefilled into the freed slot"
    assert sum(1 for e in slots.log if e[0] == "decode") == stop_at + 4  # the eos token is never fed back


def test_stop_strings_end_a_request_like_generate(model, tokenizer):
    prompt = prompt_of(8, 400)
    free_run = alone(model, prompt, 12)
    stop = tokenizer.decode(free_run[4:6])
    results = generate_batch(model, [prompt, prompt_of(5, 401)], max_new_tokens=12, do_sample=False,
                             stop_strings=[stop], tokenizer=tokenizer, num_slots=1)
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, stop_strings=[stop],
                              tokenizer=tokenizer)[0, len(prompt):].tolist()
    assert len(expected) < 12
    assert results["req_0"].generated_tokens == expected


def test_cancel_frees_the_slot_at_any_stage(model):
    slots = RecordingSlots(model, num_slots=2, max_length=64, prefill_chunk=3)
    scheduler = SlotScheduler(slots)
    for name, length in (("decoding", 4), ("prefilling", 30), ("waiting", 5), ("survivor", 6)):
        scheduler.submit(new_request(model, name, prompt_of(length, length), max_new_tokens=20, do_sample=False))
    for _ in range(4):  # "decoding" is decoding, "prefilling" is between its pieces, the others wait
        scheduler.step()
    assert scheduler.occupied_slots() == [0, 1]
    cancelled = [scheduler.cancel(name) for name in ("prefilling", "waiting", "decoding")]
    for event in cancelled:
        assert event.status == RequestStatus.FAILED and event.token is None
        assert event.output.status == RequestStatus.FAILED and event.output.error == CANCELLED
    assert cancelled[2].output.generated_tokens, "the decoding request keeps what it generated"
    assert scheduler.occupied_slots() == [] and slots.inner.occupied_slots() == []
    assert scheduler.cancel("decoding") is None, "cancelling twice is a no-op"
    events = run_with_arrivals(scheduler, [], [])
    assert [e.request_id for e in events if e.output is not None] == ["survivor"]
    assert events[-1].output.generated_tokens == alone(model, prompt_of(6, 6), 20)
    assert not any(e.request_id in ("prefilling", "waiting") for e in events)


def _live_tensors():
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on torch.distributed's deprecated aliases warns
        warnings.simplefilter("ignore", FutureWarning)
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def test_200_finished_or_cancelled_requests_leave_nothing_behind(model):
    slots = DenseSlots(model, num_slots=3, max_length=16, prefill_chunk=2)
    with ServingManager(slots) as manager:
        def serve(first, count):
            ids = [manager.add_request(prompt_of(1 + i % 7, i), max_new_tokens=1 + i % 4, do_sample=i % 2 == 0,
                                       streaming=(i - first) % 3 == 0) for i in range(first, first + count)]
            for rid in ids[::2]:
                manager.cancel_request(rid)
            outputs = [manager.get_result(rid, timeout=30) for rid in ids]
            list(manager.stream(ids[::3]))  # take the streamed events too
            return outputs

        serve(0, 20)
        baseline = _live_tensors()
        outputs = serve(20, 200)
        after = _live_tensors()
        assert all(out is not None and out.is_finished() for out in outputs)
        assert any(out.error == CANCELLED for out in outputs)
        assert sum(out.status == RequestStatus.FINISHED for out in outputs) >= 100  # half are cancelled, maybe late
        assert after <= baseline, f"{after - baseline} more live tensors after 200 more requests"
        assert slots.occupied_slots() == [] and manager.scheduler.live_requests == 0
        assert not manager._results and not manager._open and not manager._streaming


@pytest.mark.parametrize("case", ["too_long", "empty", "beams", "return_sequences", "stop_strings"])
def test_impossible_requests_are_refused_before_any_work(model, case, monkeypatch):
    calls = []
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(1))
    good = prompt_of(5, 0)
    inputs, kwargs, message = {
        "too_long": ([good, prompt_of(30, 1)], dict(max_new_tokens=8, max_length=32), "can never fit"),
        "empty": ([good, []], dict(max_new_tokens=4), "empty prompt"),
        "beams": ([good], dict(max_new_tokens=4, num_beams=2), "num_beams=2"),
        "return_sequences": ([good], dict(max_new_tokens=4, num_return_sequences=2, do_sample=True),
                             "num_return_sequences=2"),
        "stop_strings": ([good], dict(max_new_tokens=4, stop_strings=["x"]), "tokenizer"),
    }[case]
    with pytest.raises(ValueError, match=message) as refused:
        generate_batch(model, inputs, **{"do_sample": False, **kwargs})
    if case == "too_long":
        assert "38" in str(refused.value) and "max_length=32" in str(refused.value)
    assert calls == []


def test_manager_refuses_at_add_time(model):
    slots = DenseSlots(model, num_slots=1, max_length=10)
    manager = ServingManager(slots)
    with pytest.raises(ValueError, match=r"needs 12 positions .* max_length=10"):
        manager.add_request(prompt_of(8, 0), max_new_tokens=4)
    with pytest.raises(ValueError, match="empty prompt"):
        manager.add_request([], max_new_tokens=4)
    with pytest.raises(TypeError, match="not generation settings"):
        manager.add_request(prompt_of(3, 0), max_new_tokens=4, attention_mask=None, frobnicate=1)
    rid = manager.add_request(prompt_of(3, 0), request_id="same", max_new_tokens=2)
    with pytest.raises(ValueError, match="in use"):
        manager.add_request(prompt_of(3, 0), request_id=rid, max_new_tokens=2)


def test_stream_yields_every_token_once_in_order(model):
    prompts = [prompt_of(n, 500 + n) for n in (3, 17, 8, 1, 12)]
    slots = DenseSlots(model, num_slots=2, max_length=32, prefill_chunk=4)
    with ServingManager(slots) as manager:
        ids = [manager.add_request(p, max_new_tokens=5 + i, do_sample=False, streaming=True)
               for i, p in enumerate(prompts[:3])]
        events = []
        for event in manager:
            events.append(event)
            if len(events) == 4:  # requests arriving while the others decode
                ids += [manager.add_request(p, request_id=f"late_{k}", max_new_tokens=6, do_sample=False,
                                            streaming=True) for k, p in enumerate(prompts[3:])]
            if sum(e.output is not None for e in events) == len(prompts):
                break
        with pytest.raises(ValueError, match="not streamed"):
            manager.stream(ids)  # every last event was taken
        results = {rid: manager.get_result(rid, timeout=10) for rid in ids}
    assert {e.request_id for e in events} == set(ids)
    for i, rid in enumerate(ids):
        own = [e for e in events if e.request_id == rid]
        assert [e.token for e in own] == results[rid].generated_tokens
        assert results[rid].generated_tokens == alone(model, prompts[i], 5 + i if i < 3 else 6)
        assert all(e.status == RequestStatus.DECODING and e.output is None for e in own[:-1])
        assert own[-1].status == RequestStatus.FINISHED and own[-1].output == results[rid]


def test_a_long_prefill_runs_in_pieces_between_decode_steps(model):
    slots = RecordingSlots(model, num_slots=2, max_length=64, prefill_chunk=4)
    scheduler = SlotScheduler(slots)
    short, long = prompt_of(3, 600), prompt_of(41, 601)
    runner = new_request(model, "runner", short, max_new_tokens=30, do_sample=False)
    late = new_request(model, "late", long, max_new_tokens=3, do_sample=False)
    events = run_with_arrivals(scheduler, [runner, late], [0, 3])
    long_pieces = [i for i, entry in enumerate(slots.log) if entry == ("piece", 1)]
    assert len(long_pieces) == 11  # ceil(41 / 4)
    for a, b in zip(long_pieces, long_pieces[1:]):
        assert slots.log[a + 1] == ("decode", (0,)), "the running slot decodes between two prefill pieces"
        assert b == a + 2
    outputs = {e.request_id: e.output for e in events if e.output is not None}
    assert outputs["runner"].generated_tokens == alone(model, short, 30)
    assert outputs["late"].generated_tokens == alone(model, long, 3)


def test_a_failing_step_fails_open_requests_and_frees_slots(model):
    slots = DenseSlots(model, num_slots=2, max_length=32)
    real_decode = slots.decode
    steps = []

    def flaky_decode(tokens, active):
        steps.append(1)
        if len(steps) == 3:
            raise RuntimeError("device lost")
        return real_decode(tokens, active)

    slots.decode = flaky_decode
    manager = ServingManager(slots)
    ids = [manager.add_request(prompt_of(4, 700 + i), max_new_tokens=8, do_sample=False) for i in range(3)]
    with manager:  # all three are open when the third step fails
        outputs = [manager.get_result(rid, timeout=30) for rid in ids]
    assert all(out.status == RequestStatus.FAILED and "device lost" in out.error for out in outputs), outputs
    assert slots.occupied_slots() == []
    assert isinstance(manager.error, RuntimeError)
    with pytest.raises(RuntimeError, match="stopped after an error"):
        manager.add_request(prompt_of(4, 0), max_new_tokens=2)


def test_a_stopped_manager_refuses_new_requests_and_an_optimized_model_is_not_served_dense(model):
    import shadowkv_fx

    manager = ServingManager(DenseSlots(model, num_slots=1, max_length=16))
    with manager:
        rid = manager.add_request(prompt_of(3, 0), max_new_tokens=2, do_sample=False)
    assert manager.get_result(rid).generated_tokens == alone(model, prompt_of(3, 0), 2)
    with pytest.raises(RuntimeError, match="start\\(\\) it again"):
        manager.add_request(prompt_of(3, 0), max_new_tokens=2)

    optimized = tiny_pair("llama")[1]
    shadowkv_fx.optimize(optimized, shadowkv_fx.ShadowKVConfig(sparse_budget=64, rank=8, chunk_size=8))
    with pytest.raises(ValueError, match="optimized"):
        DenseSlots(optimized, num_slots=1, max_length=16)
