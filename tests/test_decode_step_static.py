"""A decode step must be replayable as a CUDA graph: fixed buffers, device-side counts, no host sync.

These run on CPU; tests/test_cuda_graph.py captures and replays on a GPU.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import shadowkv_fx
from shadowkv_fx import decode_step
from tests.models import assert_close, left_padded, tiny_pair
from shadowkv_fx.compat import output_cache

SMALL = shadowkv_fx.ShadowKVConfig(sparse_budget=16, rank=8, chunk_size=4, local_chunks=2, outlier_chunks=2)
# ops that read device memory on the host (item/tolist/bool) or size an output from data
HOST_SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "repeat_interleave.Tensor"}


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(f"{func.overloadpacket.__name__}" + ("" if func._overloadname == "default" else f".{func._overloadname}"))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def model():
    _, m = tiny_pair("llama", seed=3, peaked=True)
    return shadowkv_fx.optimize(m, SMALL)


def prefill(model, lengths, tail_capacity=8):
    ids, mask = left_padded(len(lengths), lengths, 96, seed=3)
    cache = model._shadowkv.new_cache(tail_capacity)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, cache=cache)
    return out.logits[:, -1:].argmax(-1), cache


def record_decode_ops(monkeypatch) -> list[str]:
    """Make every ``decode_step.decode`` fail on a read of the host-side tail count and log its ops
    into the returned list."""
    plain, seen = decode_step.decode, []

    def guarded(state, *args):
        host_count, state.tail_len = state.tail_len, None  # any read of the host count fails
        log = OpLog()
        try:
            with log:
                return plain(state, *args)
        finally:
            state.tail_len = host_count
            seen.extend(log.names)

    monkeypatch.setattr(decode_step, "decode", guarded)
    return seen


def assert_decode_steps_never_sync(model, token, cache, monkeypatch, steps: int = 3):
    """Run ``steps`` greedy decode steps and check the decode op made no host-syncing call."""
    seen = record_decode_ops(monkeypatch)
    with torch.no_grad():
        for _ in range(steps):
            token = model(token, cache=cache).logits[:, -1:].argmax(-1)
    assert seen, "the decode op ran"
    assert not HOST_SYNC_OPS & set(seen), sorted(HOST_SYNC_OPS & set(seen))


def test_decode_op_never_reads_the_host_count_or_syncs(model, monkeypatch):
    token, cache = prefill(model, [90, 61])
    assert_decode_steps_never_sync(model, token, cache, monkeypatch)


def test_decode_buffers_keep_their_addresses_until_the_tail_must_grow(model):
    token, cache = prefill(model, [90, 61], tail_capacity=4)
    state = cache.layers[0].state
    addresses = lambda: [t.data_ptr() for t in (state.tail_k, state.tail_v, state.tail_fill, state.u, state.landmarks)]
    before = addresses()
    cache.decode_graphs[("marker",)] = "warm"
    with torch.no_grad():
        for step in range(4):
            token = model(token, cache=cache).logits[:, -1:].argmax(-1)
            assert addresses() == before, f"step {step} moved a buffer"
        assert ("marker",) in cache.decode_graphs
        model(token, cache=cache)  # the fifth token does not fit: buffers move
    assert addresses()[:2] != before[:2]
    assert state.tail_k.shape[2] == 8 and state.tail_len == 5 and int(state.tail_fill) == 5
    assert not cache.decode_graphs, "graphs holding the old buffers are dropped"


def test_tail_capacity_does_not_change_the_tokens(model):
    ids, mask = left_padded(2, [90, 61], 96, seed=4)
    outs = []
    for capacity in (1, 64):
        cache = model._shadowkv.new_cache(capacity)
        with torch.no_grad():
            outs.append(model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=9, min_new_tokens=9,
                                       do_sample=False, pad_token_id=0, output_logits=True,
                                       return_dict_in_generate=True))
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    for step, (a, b) in enumerate(zip(outs[0].logits, outs[1].logits)):
        assert_close(a, b, atol=1e-5, rtol=1e-5, what=f"logits at step {step}")


def test_generate_sizes_the_tail_for_max_new_tokens(model, monkeypatch):
    made = []
    plain = model._shadowkv.new_cache
    monkeypatch.setattr(model._shadowkv, "new_cache", lambda capacity=64: made.append(capacity) or plain(capacity))
    ids, mask = left_padded(1, [70], 96)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=11, min_new_tokens=11, do_sample=False,
                             pad_token_id=0, return_dict_in_generate=True)
    assert made == [11]
    assert output_cache(out).layers[0].state.tail_k.shape[2] == 11, "no growth mid-generation"


def test_a_finished_cache_is_freed_without_the_cycle_collector(model):
    """Pinned host memory and CUDA graphs go when the cache goes, not at some later gc pass
    (which could land inside another cache's graph capture)."""
    import gc
    import weakref

    ids, mask = left_padded(1, [90], 96)
    gc.collect()
    gc.disable()
    try:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                                 return_dict_in_generate=True)
        cache = weakref.ref(output_cache(out))
        assert cache() is not None
        del out
        assert cache() is None, "a reference cycle keeps the cache alive"
    finally:
        gc.enable()


def test_cuda_graphs_on_a_cpu_model_decode_plainly():
    _, plain = tiny_pair("llama", seed=3, peaked=True)
    _, asked = tiny_pair("llama", seed=3, peaked=True)
    shadowkv_fx.optimize(plain, SMALL)
    shadowkv_fx.optimize(asked, SMALL, cuda_graphs=True)
    ids, mask = left_padded(2, [90, 61], 96, seed=3)
    outs = []
    for model in (plain, asked):
        with torch.no_grad():
            outs.append(model.generate(ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                                       pad_token_id=0, output_logits=True, return_dict_in_generate=True))
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    for step, (a, b) in enumerate(zip(outs[0].logits, outs[1].logits)):
        assert_close(a, b, atol=1e-5, rtol=1e-5, what=f"logits at step {step}")
    assert not output_cache(outs[1]).decode_graphs


def test_only_one_token_steps_are_captured():
    """A verification step's draft length varies step to step: capturing it would pay a warm-up
    and a capture per length for a graph that rarely replays."""
    from shadowkv_fx.cuda_graph import capturable

    class OnCuda:
        def __init__(self, n):
            self.shape = (1, n)
            self.device = torch.device("cuda")

    assert capturable(OnCuda(1), {"logits_to_keep": 1})
    assert not capturable(OnCuda(4), {"logits_to_keep": 1})
    assert not capturable(OnCuda(1), {"output_hidden_states": True})
