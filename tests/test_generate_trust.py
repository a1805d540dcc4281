"""generate() you can trust: every argument equals dense at full budget or is refused up front,
threads and copies are independent, speculation never changes the output (issue #14)."""
import copy
import warnings

import pytest
import torch
import transformers
from hypothesis import given, settings, strategies as st

import shadowkv_fx
from shadowkv_fx.compat import output_cache
from tests.models import assert_close, full_rank, left_padded, run_threads_against_serial, tiny_pair

CHUNK = 4
GREEDY = dict(do_sample=False, pad_token_id=0)
SCORED = dict(output_logits=True, return_dict_in_generate=True)


def assert_same(actual, expected, atol=2e-4, what="") -> None:
    """Same tokens and, step by step, the same logits (within ``atol``)."""
    assert torch.equal(actual.sequences, expected.sequences), (what, actual.sequences, expected.sequences)
    for step, (a, e) in enumerate(zip(actual.logits, expected.logits, strict=True)):
        assert_close(a, e, atol=atol, rtol=1e-4, what=f"{what} logits at step {step}")


def full(model) -> shadowkv_fx.ShadowKVConfig:
    return shadowkv_fx.ShadowKVConfig(sparse_budget=4096, rank=full_rank(model), chunk_size=CHUNK, local_chunks=2,
                                      outlier_chunks=2)


def sparse() -> shadowkv_fx.ShadowKVConfig:
    return shadowkv_fx.ShadowKVConfig(sparse_budget=2 * CHUNK, rank=8, chunk_size=CHUNK, local_chunks=1,
                                      outlier_chunks=1)


@pytest.fixture(scope="module")
def pair():
    dense, model = tiny_pair("llama", seed=5, peaked=True)
    return dense, shadowkv_fx.optimize(model, full(model))


def test_use_cache_false_is_a_plain_forward_with_dense_logits(pair):
    dense, model = pair
    ids, mask = left_padded(2, [30, 21], 96, seed=1)
    args = dict(attention_mask=mask, max_new_tokens=4, use_cache=False, output_logits=True,
                return_dict_in_generate=True, **GREEDY)
    with torch.no_grad():
        expected, actual = dense.generate(ids, **args), model.generate(ids, **args)
    assert torch.equal(actual.sequences, expected.sequences)
    for a, e in zip(actual.logits, expected.logits):
        assert_close(a, e, atol=1e-5, rtol=1e-5, what="logits with use_cache=False")
    assert output_cache(actual) is None, "use_cache=False keeps no cache"


@settings(max_examples=2)
@given(threads=st.integers(2, 4), seed=st.integers(0, 1000))
def test_threads_on_one_model_get_their_serial_tokens(threads, seed):
    _, model = tiny_pair("llama", seed=seed, peaked=True)
    shadowkv_fx.optimize(model, sparse())
    prompts = [left_padded(1 + i % 2, [40 + 3 * i, 33][: 1 + i % 2], 96, seed=seed + i) for i in range(threads)]

    def job(ids, mask):
        return lambda: model.generate(ids, attention_mask=mask, max_new_tokens=5, **GREEDY)

    run_threads_against_serial([job(*p) for p in prompts], runs=2)


def test_threads_on_two_models_get_their_serial_tokens():
    models = []
    for seed in (1, 2):
        _, m = tiny_pair("llama", seed=seed, peaked=True)
        models.append(shadowkv_fx.optimize(m, sparse()))
    ids, mask = left_padded(2, [44, 37], 96, seed=3)
    jobs = [lambda m=m: m.generate(ids, attention_mask=mask, max_new_tokens=5, **GREEDY) for m in models]
    run_threads_against_serial(jobs, runs=2)


def test_deepcopy_is_an_independent_optimized_model(pair):
    dense, model = pair
    clone = copy.deepcopy(model)
    assert clone._shadowkv is not model._shadowkv and clone._shadowkv.config == model._shadowkv.config
    other_dense = copy.deepcopy(dense)
    with torch.no_grad():
        for p, q in zip(clone.parameters(), other_dense.parameters()):
            p.mul_(1.3)
            q.mul_(1.3)
    ids, mask = left_padded(1, [36], 96, seed=4)
    args = dict(attention_mask=mask, max_new_tokens=5, min_new_tokens=5, **GREEDY, **SCORED)
    with torch.no_grad():
        from_clone = clone.generate(ids, **args)
        from_original = model.generate(ids, **args)
        assert_same(from_clone, other_dense.generate(ids, **args), what="copy")
        assert_same(from_original, dense.generate(ids, **args), what="original")
    assert not torch.equal(from_clone.sequences, from_original.sequences), "the copy's weights changed, so must its tokens"


@settings(max_examples=2)
@given(draft=st.integers(1, 5), length=st.integers(30, 60), seed=st.integers(0, 1000))
def test_prompt_lookup_never_changes_the_output(draft, length, seed):
    dense, model = tiny_pair("llama", seed=seed, peaked=True)
    shadowkv_fx.optimize(model, sparse())
    half = torch.randint(3, 96, (1, length // 2), generator=torch.Generator().manual_seed(seed))
    ids = torch.cat([half, half], 1)  # repeats give prompt lookup drafts to verify
    mask = torch.ones_like(ids)
    with torch.no_grad():
        plain = model.generate(ids, attention_mask=mask, max_new_tokens=8, **GREEDY, **SCORED)
        spec = model.generate(ids, attention_mask=mask, max_new_tokens=8, prompt_lookup_num_tokens=draft, **GREEDY,
                              **SCORED)
    assert_same(spec, plain, atol=1e-4, what="sparse ShadowKV with speculation == without:")


@pytest.mark.parametrize("spelling", ["int", "tensor"])
def test_crop_keeps_every_layer_its_own_tail_count(spelling):
    """transformers 5.17's assisted decoding crops with a 0-d tensor; a count shared by every layer
    would be added to once per layer at the next step and overrun the tail buffer."""
    _, model = tiny_pair("llama", seed=3)
    shadowkv_fx.optimize(model, sparse())
    ids, mask = left_padded(1, [40], 96, seed=2)
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        cache = output_cache(out)
        for token in (5, 6, 7):
            out = model(torch.tensor([[token]]), cache=cache)
        cache.crop(torch.tensor(-2) if spelling == "tensor" else -2)
        for step in range(3):
            out = model(torch.tensor([[8, 9, 10]]), cache=cache)
    tails = [layer.state.tail_len for layer in cache.layers]
    assert all(type(t) is int for t in tails) and tails == [1 + 9] * len(tails)
    assert type(cache.seq_length) is int and cache.seq_length == 40 + 10


def test_assisted_decoding_at_full_budget_equals_dense_assisted(pair):
    dense, model = pair
    _, assistant = tiny_pair("llama", seed=9, layers=1)
    ids, mask = left_padded(1, [41], 96, seed=6)
    args = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, **GREEDY, **SCORED)
    with torch.no_grad():
        assisted = model.generate(ids, assistant_model=assistant, **args)
        assert_same(assisted, dense.generate(ids, assistant_model=assistant, **args), what="assisted")
        assert_same(assisted, dense.generate(ids, **args), what="assisted vs plain dense")


@settings(max_examples=3)
@given(chunk=st.integers(5, 40), lengths=st.lists(st.integers(25, 70), min_size=1, max_size=2))
def test_chunked_prefill_compresses_everything(chunk, lengths):
    _, model = tiny_pair("llama", seed=2, peaked=True)
    shadowkv_fx.optimize(model, sparse())
    ids, mask = left_padded(len(lengths), lengths, 96, seed=chunk)
    args = dict(attention_mask=mask, max_new_tokens=5, **GREEDY, **SCORED)
    with torch.no_grad():
        whole = model.generate(ids, **args)
        pieces = model.generate(ids, prefill_chunk_size=chunk, **args)
    assert_same(pieces, whole, atol=1e-4, what="chunked prefill")
    a, b = output_cache(whole).memory_report(), output_cache(pieces).memory_report()
    assert a == b, "the same compressed state, byte for byte"
    assert b["cpu"].get("offloaded_V", 0) > 0, "values were offloaded, not left in the dense tail"


class _NoPrefill:
    """Stands in for the compiled forward: any call means work started before the refusal."""

    def __call__(self, *args, **kwargs):
        raise AssertionError("the prefill ran before the argument was refused")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(output_hidden_states=True, return_dict_in_generate=True), ValueError, "output_hidden_states"),
    (dict(output_attentions=True, return_dict_in_generate=True), ValueError, "output_attentions"),
    (dict(num_beams=2), NotImplementedError, "num_beams"),
    (dict(generation_config=transformers.GenerationConfig(num_beams=3, max_new_tokens=3)), NotImplementedError,
     "beam search"),
    (dict(max_new_tokens=2100), ValueError, "max_position_embeddings=2048"),
])
def test_refused_before_any_prefill(pair, kwargs, error, match):
    _, model = pair
    ids, mask = left_padded(1, [20], 96)
    kwargs = {"max_new_tokens": 3, **kwargs}
    streamer = transformers.TextIteratorStreamer(tokenizer=None, timeout=5)
    inner, model._shadowkv.inner = model._shadowkv.inner, _NoPrefill()
    try:
        with pytest.raises(error, match=match):
            model.generate(ids, attention_mask=mask, streamer=streamer, **GREEDY, **kwargs)
    finally:
        model._shadowkv.inner = inner
    assert "".join(streamer) == "", "a refused call ends its streamer: a reader does not wait forever"


def test_beam_search_in_the_models_generation_config_is_refused_up_front():
    _, model = tiny_pair("llama")
    model.generation_config.num_beams = 2
    shadowkv_fx.optimize(model, sparse(), validate=False)
    model._shadowkv.inner = _NoPrefill()
    with pytest.raises(NotImplementedError, match="beam search"):
        model.generate(torch.ones(1, 9, dtype=torch.long) * 5, max_new_tokens=2)


def test_cache_implementation_is_ignored_with_a_warning_naming_shadowkv(pair):
    dense, model = pair
    ids, mask = left_padded(1, [26], 96, seed=8)
    with pytest.warns(UserWarning, match="ShadowKVCache"):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=4, cache_implementation="static",
                             **GREEDY, **SCORED)
    assert isinstance(output_cache(out), shadowkv_fx.ShadowKVCache)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_same(out, dense.generate(ids, attention_mask=mask, max_new_tokens=4, **GREEDY, **SCORED))


def test_recompile_limit_is_raised_on_every_thread_at_once():
    """torch >= 2.13 keeps dynamo's config per thread: a second thread entering while the first is
    inside must compile under the raised limit too (it hit the default 8 and failed fullgraph)."""
    import threading

    from shadowkv_fx.dynamo_limits import RECOMPILE_LIMIT, recompile_limit

    seen, inside, release = [], threading.Event(), threading.Event()

    def first():
        with recompile_limit(RECOMPILE_LIMIT):
            inside.set()
            release.wait(10)

    def second():
        inside.wait(10)
        with recompile_limit(RECOMPILE_LIMIT):
            seen.append(torch._dynamo.config.recompile_limit)
        release.set()

    workers = [threading.Thread(target=first), threading.Thread(target=second)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(20)
    assert seen == [max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)]
