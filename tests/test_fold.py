"""Folding the dense tail into the compressed store (issue #15, shadowkv_fx/fold.py).

Compiling an optimized model costs seconds, and folding lives in the cache, never in the traced
graph: every test here runs one compiled model (``shared()``), each sparse setting in a cache of
its own config (``generate(..., config=)``), and dynamo's caches are reset for the module only.
"""
import dataclasses
import functools
from unittest import mock

import pytest
import torch
from hypothesis import example, given, settings, strategies as st

import shadowkv_fx
from shadowkv_fx import fold
from shadowkv_fx.cache import ShadowKVCache, device_and_host_bytes
from shadowkv_fx.compat import output_cache
from shadowkv_fx.kernels import compression
from tests.models import (_dynamo_reset_for_the_module, _fresh_dynamo, assert_close, full_rank,  # noqa: F401
                          left_padded, tiny_pair)

CHUNK, LOCAL, OUTLIERS = 4, 2, 2
GREEDY = dict(do_sample=False, pad_token_id=0)
SPARSE = shadowkv_fx.ShadowKVConfig(sparse_budget=16, rank=8, chunk_size=CHUNK, local_chunks=LOCAL,
                                    outlier_chunks=OUTLIERS, fold_chunks=1)


@functools.cache
def shared():
    """A dense model and its optimized twin (full budget and rank unless a cache says otherwise).
    4 KV heads of 32 and 2 layers: wide enough that the RoPE rows, one per token for all layers,
    stay a small part of a folding cache's growth."""
    dense, model = tiny_pair("llama", kv_heads=4, head_dim=32, seed=11, peaked=True)
    return dense, shadowkv_fx.optimize(model, full_config(model))


def full_config(model, **kwargs) -> shadowkv_fx.ShadowKVConfig:
    return shadowkv_fx.ShadowKVConfig(sparse_budget=4096, rank=full_rank(model), chunk_size=CHUNK, local_chunks=LOCAL,
                                      outlier_chunks=OUTLIERS, **{"fold_chunks": 1, **kwargs})


def new_cache(model, config, tail_capacity: int) -> ShadowKVCache:
    return ShadowKVCache(model.config.num_hidden_layers, config, tail_capacity)


def generate(model, ids, mask, n, config=None, **kwargs):
    """``n`` greedy tokens; with ``config``, into a fresh cache of that config (the compiled graph
    does not depend on it)."""
    if config is not None:
        kwargs["cache"] = new_cache(model, config, n)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, output_logits=True,
                              return_dict_in_generate=True, **GREEDY, **kwargs)


def assert_same(actual, expected, atol=2e-4):
    assert torch.equal(actual.sequences, expected.sequences), (actual.sequences, expected.sequences)
    for step, (a, e) in enumerate(zip(actual.logits, expected.logits)):
        assert_close(a, e, atol=atol, rtol=1e-4, what=f"logits at step {step}")


@settings(max_examples=3, deadline=None)
@given(lengths=st.lists(st.integers(8, 60), min_size=1, max_size=2), new_tokens=st.integers(12, 40),
       seed=st.integers(0, 2**16))
@example(lengths=[45, 21], new_tokens=40, seed=0)
# a row too short to compress never folds, so the tail is never compacted and the other row hides
# the slots it folded (``tail_first``)
@example(lengths=[47, 13], new_tokens=24, seed=1)
def test_full_budget_and_rank_folding_equals_dense(lengths, new_tokens, seed):
    """Folds of the local window and of generated tokens, basis refreshes, outlier swaps and tail
    compaction change nothing at full budget and rank; rows too short to compress stay dense."""
    dense, model = shared()
    ids, mask = left_padded(len(lengths), lengths, 96, seed)
    expected, actual = generate(dense, ids, mask, new_tokens), generate(model, ids, mask, new_tokens)
    assert_same(actual, expected)
    state = output_cache(actual).layers[0].state
    min_sparse = (LOCAL + OUTLIERS + 1) * CHUNK
    for b, n in enumerate(lengths):
        dense_tokens = n + new_tokens - 1 - state.prompt_chunks[b] * CHUNK
        if n >= min_sparse and dense_tokens >= (LOCAL + 1) * CHUNK:
            assert state.chunks[b] > state.prompt_chunks[b], f"row {b} must have folded"
        if n < min_sparse:
            assert state.chunks[b] == 0, "a row never compressed keeps its tokens dense"
    if all(n >= min_sparse for n in lengths):
        assert_outliers_are_the_worst_chunks(state, expected, ids.shape[1], lengths)


def assert_outliers_are_the_worst_chunks(state, dense_out, width, lengths):
    """The outliers are what prefill would pick over everything folded so far: the lowest min-cosine chunks."""
    keys = dense_out.past_key_values.layers[0].keys
    for b, n in enumerate(lengths):
        chunks = state.chunks[b]
        _, min_cos = compression.chunk_landmarks(keys[b, :, width - n : width - n + chunks * CHUNK], CHUNK)
        expected = torch.topk(-min_cos, OUTLIERS, dim=-1).indices.sort(-1).values
        assert torch.equal(state.outlier_ids[b].sort(-1).values, expected), b


def test_projection_and_incremental_svd_refresh():
    torch.manual_seed(0)
    hkv, d, rank = 2, 8, 6
    basis = torch.randn(rank, hkv * d)
    old = (torch.randn(40, rank) @ basis).view(40, hkv, d).permute(1, 0, 2)
    u, sv = compression.low_rank_keys(old, rank)
    inside = (torch.randn(8, rank) @ basis).view(8, hkv, d).permute(1, 0, 2)
    u_new, err = fold.project_keys(sv, inside)
    assert err < 1e-5, "keys in the basis's span project exactly"
    assert_close(torch.einsum("nr,hrd->hnd", u_new, sv), inside, atol=1e-4, what="projection")

    outside = torch.randn(hkv, 8, d)
    _, err = fold.project_keys(sv, outside)
    assert err > 0.3
    # full rank of the stack: the refreshed factors reproduce old and new keys exactly
    wide_sv = torch.cat([sv, sv.new_zeros(hkv, hkv * d - rank, d)], dim=1)
    wide_u = torch.cat([u, u.new_zeros(40, hkv * d - rank)], dim=1)
    rotation, u_new, sv_new, fit = fold.refresh_basis(wide_sv, outside)
    assert fit < 1e-6
    assert_close(torch.einsum("nr,hrd->hnd", wide_u @ rotation, sv_new), old, atol=1e-4, what="old keys")
    assert_close(torch.einsum("nr,hrd->hnd", u_new, sv_new), outside, atol=1e-4, what="new keys")
    # truncated: as good as a fresh rank-r SVD of old and new keys together (U has orthonormal columns)
    rotation, u_new, sv_new, fit = fold.refresh_basis(sv, outside)
    rebuilt = torch.cat([torch.einsum("nr,hrd->hnd", u @ rotation, sv_new), torch.einsum("nr,hrd->hnd", u_new, sv_new)], 1)
    both = torch.cat([old, outside], dim=1)
    fresh_u, fresh_sv = compression.low_rank_keys(both, rank)
    fresh_err = (torch.einsum("nr,hrd->hnd", fresh_u, fresh_sv) - both).norm() / both.norm()
    err = (rebuilt - both).norm() / both.norm()
    assert err <= fresh_err * 1.0001 + 1e-6 and abs(err - fit) < 1e-4


def test_sparse_fold_keeps_device_growth_under_a_quarter_of_dense():
    """Over a long generation the device bytes per sequence grow by U rows, landmarks and RoPE
    inputs only (<= 1/4 of a dense cache per token); without folding they grow as dense does."""
    ids, mask = left_padded(1, [160], 96, seed=3)
    _, model = shared()

    def device_bytes(config, new_tokens, prefill_only=False):
        if prefill_only:  # what the buffers hold is fixed at prefill: sized for ``new_tokens``
            cache = new_cache(model, config, new_tokens)
            with torch.no_grad():
                model(ids, attention_mask=mask, cache=cache)
            cache.layers[0].state.advance(new_tokens - 1)  # the dense bytes it stands for
        else:
            cache = output_cache(generate(model, ids, mask, new_tokens, config))
        report = cache.memory_report()
        return device_and_host_bytes(report)[0], report["dense"]["kv"], cache

    config = dataclasses.replace(SPARSE, rank=8, chunk_size=8, sparse_budget=32, fold_chunks=2)
    few, dense_few, _ = device_bytes(config, 48)  # past the fold window: the dense tail is full
    many, dense_many, cache = device_bytes(config, 112)
    growth = (many - few) / (dense_many - dense_few)
    assert growth <= 0.25, growth
    state = cache.layers[0].state
    assert state.chunks[0] * 8 >= 160 + 111 - config.fold_window, "everything but the fold window folded"
    assert state.k_buf.shape[2] - state.tail_start <= config.fold_window
    plain = dataclasses.replace(config, fold_chunks=None)
    few, _, _ = device_bytes(plain, 48, prefill_only=True)
    many, _, _ = device_bytes(plain, 112, prefill_only=True)
    assert (many - few) / (dense_many - dense_few) > 0.9


# 13: too short to compress, stays dense beside rows that fold; rows 0 and 2 of the second fold
# together (one batched fold of two rows that are not neighbours)
@pytest.mark.parametrize("lengths", [[90, 13, 61], [90, 61, 90, 13]])
def test_variable_length_batch_rows_fold_as_they_would_alone(lengths):
    _, model = shared()
    ids, mask = left_padded(len(lengths), lengths, 96, seed=5)
    together = generate(model, ids, mask, 30, SPARSE)
    state = output_cache(together).layers[0].state
    assert state.chunks[0] > state.prompt_chunks[0] and state.chunks[lengths.index(13)] == 0
    width = ids.shape[1]
    for b, n in enumerate(lengths):
        alone = generate(model, ids[b:b + 1, width - n:], mask[b:b + 1, width - n:], 30, SPARSE)
        assert torch.equal(together.sequences[b, width:], alone.sequences[0, n:]), b
        for step, (t, a) in enumerate(zip(together.logits, alone.logits)):
            assert_close(t[b], a[0], atol=1e-4, rtol=1e-4, what=f"row {b} step {step}")


def test_crop_keeps_unfolded_tokens_and_refuses_folded_ones():
    _, model = shared()
    ids, mask = left_padded(1, [70], 96, seed=2)
    out = generate(model, ids, mask, 30, SPARSE)
    cache = output_cache(out)
    length = cache.get_seq_length()
    with pytest.raises(ValueError, match="folded into the compressed store"):
        cache.crop(70 + 2)
    assert cache.get_seq_length() == length, "a refused crop changes nothing"
    cache.crop(-2)
    with torch.no_grad():
        resumed = model(out.sequences[:, -3:-1], cache=cache).logits[:, -1]
    assert_close(resumed, out.logits[-1][:, :], atol=1e-4, rtol=1e-4, what="logits after crop")


@pytest.mark.parametrize("draft", [3])
def test_prompt_lookup_crops_drafts_after_folds_and_equals_dense(draft):
    """Speculation crops rejected drafts between folds; at full budget and rank the tokens are dense's."""
    dense, model = shared()
    half = torch.randint(3, 96, (1, 24), generator=torch.Generator().manual_seed(1))
    ids = torch.cat([half, half], 1)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = dense.generate(ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, **GREEDY)
        spec = model.generate(ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20,
                              prompt_lookup_num_tokens=draft, **GREEDY)
    assert torch.equal(spec, expected)


@settings(max_examples=3, deadline=None)
@given(draft=st.integers(3, 6), half=st.integers(12, 25), local=st.integers(0, 2), rank=st.sampled_from([8, 30]),
       seed=st.integers(0, 2**16))
@example(draft=6, half=25, local=0, rank=30, seed=0)
def test_prompt_lookup_with_folding_equals_plain_greedy_at_sparse_settings(draft, half, local, rank, seed):
    """Issue #14 point 3 with folding on: a verification step runs in pieces split where one token
    at a time would fold, and the crop of drafts past such a fold takes it back (``FoldUndo``: the
    basis refresh, outlier swaps and tail compaction too), so speculation changes no token or logit
    and its crops never raise. ``local=0`` folds the step's own drafts."""
    _, model = shared()
    config = dataclasses.replace(SPARSE, local_chunks=local, rank=rank)
    words = torch.randint(3, 96, (1, half), generator=torch.Generator().manual_seed(seed))
    ids = torch.cat([words, words], 1)  # repeats give prompt lookup drafts to verify
    mask = torch.ones_like(ids)
    plain = generate(model, ids, mask, 24, config)
    with mock.patch.object(fold, "FoldUndo", wraps=fold.FoldUndo) as undoable:
        spec = generate(model, ids, mask, 24, config, prompt_lookup_num_tokens=draft)
    assert_same(spec, plain)
    state = output_cache(spec).layers[0].state
    assert state.chunks[0] > state.prompt_chunks[0], "it folded"
    assert undoable.call_count > 0, "a verification step folded past its first token"


def test_a_split_step_that_fails_half_way_caches_nothing(monkeypatch):
    from shadowkv_fx import decode_step

    _, model = shared()
    ids, mask = left_padded(1, [47], 96, seed=1)
    cache = new_cache(model, SPARSE, 8)
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=cache)
    plain, calls = decode_step.decode, []

    def failing_in_the_second_piece(state, q, *args):
        calls.append(q.shape[2])
        if len(calls) > model.config.num_hidden_layers:
            raise RuntimeError("simulated device failure")
        return plain(state, q, *args)

    monkeypatch.setattr(decode_step, "decode", failing_in_the_second_piece)
    with pytest.raises(RuntimeError, match="simulated"), torch.no_grad():
        model(torch.tensor([[5, 6, 7, 8]]), cache=cache)  # a fold is due before its second token
    assert calls == [1, 1, 3], "split after the first token"
    assert cache.get_seq_length() == 47 and {layer.state.tail_len for layer in cache.layers} == {0}


def test_a_later_turn_folds_and_still_equals_dense():
    """Multi-turn through the cache: the second turn's 40 new tokens fold like generated ones."""
    dense, model = shared()
    ids, mask = left_padded(1, [30], 96, seed=4)
    cache = model._shadowkv.new_cache(8)
    first = generate(model, ids, mask, 8, cache=cache)
    turn = torch.randint(3, 96, (1, 40), generator=torch.Generator().manual_seed(4))
    ids2 = torch.cat([first.sequences, turn], 1)
    mask2 = torch.ones_like(ids2)
    before = cache.layers[0].state.chunks[0]
    second = generate(model, ids2, mask2, 10, cache=cache)
    assert_same(second, generate(dense, ids2, mask2, 10))
    state = cache.layers[0].state
    assert state.chunks[0] * CHUNK >= 30 + 8 + 40 - state.config.fold_window > before * CHUNK, "the turn folded"


def test_decode_steps_between_folds_never_sync_and_buffers_never_move(monkeypatch):
    """Folding runs between steps and in place: a captured decode step stays valid across folds."""
    from tests.test_decode_step_static import HOST_SYNC_OPS, record_decode_ops

    _, model = shared()
    ids, mask = left_padded(2, [63, 47], 96, seed=3)
    cache = new_cache(model, dataclasses.replace(SPARSE, local_chunks=1), 8)
    with torch.no_grad():
        token = model(ids, attention_mask=mask, cache=cache).logits[:, -1:].argmax(-1)
    state = cache.layers[0].state
    buffers = lambda: [t.data_ptr() for t in (state.k_buf, state.v_buf, state.key_valid, state.pre_k, state.u,  # noqa: E731
                                              state.sv, state.landmarks, state.selectable, state.v_chunks,
                                              state.tail_fill, state.tail_first, state.gen_count, *state.rope_tables)]
    before = buffers()
    cache.decode_graphs[("marker",)] = "warm"
    seen = record_decode_ops(monkeypatch)
    with torch.no_grad():
        for _ in range(6):  # local_chunks=1: both rows fold a generated token before step 5 and compact
            token = model(token, cache=cache).logits[:, -1:].argmax(-1)
    assert state.chunks[0] > state.prompt_chunks[0] and state.tail_shift > 0, "folds and compaction happened"
    assert buffers() == before and ("marker",) in cache.decode_graphs
    assert not HOST_SYNC_OPS & set(seen), sorted(HOST_SYNC_OPS & set(seen))
    fresh = type(state)(state.config)
    assert set(vars(state)) == set(vars(fresh)), "prefill, steps and folds set only the fields __init__ declares"


def test_triton_kernels_read_folded_chunks_like_the_reference(monkeypatch):
    """Scoring, top-k, fused rebuild + RoPE and decode attention as Triton kernels (interpreted on
    CPU, compiled on a GPU) in a step after folds: folded chunks' U rows, RoPE columns past the
    prompt and per-row ``tail_first`` read as the reference reads them. Only that step runs the
    kernels; the prefill and the folding steps before it run the reference in both caches."""
    pytest.importorskip("triton")
    from shadowkv_fx.kernels import dispatch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    _, model = shared()
    if device == "cuda":
        _, model = tiny_pair("llama", kv_heads=4, head_dim=32, seed=11, peaked=True)
        model = shadowkv_fx.optimize(model.to(device), full_config(model))
    # local_chunks=1: row 63 folds generated tokens before step 5, row 46 before step 6, when the
    # tail is compacted and row 46 still hides one leading slot
    config = dataclasses.replace(SPARSE, local_chunks=1)
    ids, mask = (t.to(device) for t in left_padded(2, [63, 46], 96, seed=8))
    tokens = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(8)).to(device)
    caches = [new_cache(model, config, 8) for _ in range(2)]
    logits = []
    with torch.no_grad():
        for cache in caches:
            monkeypatch.setattr(dispatch, "_triton", lambda t: False)
            model(ids, attention_mask=mask, cache=cache)
            for step in range(6):
                model(tokens[:, step : step + 1], cache=cache)
            if cache is caches[1]:
                monkeypatch.setattr(dispatch, "_triton", lambda t: True)
            logits.append(model(tokens[:, 6:], cache=cache).logits)
    assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4, what="logits of the step after the folds")
    state = caches[1].layers[0].state
    assert state.chunks[0] * CHUNK > 63 and state.chunks[1] * CHUNK > 46, "generated tokens folded"
    assert state.tail_shift > 0 and state.tail_first_host == [0, 1]
