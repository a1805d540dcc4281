"""Full budget + full rank: ShadowKV's sparse path must reproduce dense attention (DESIGN.md §5)."""
import pytest
import torch
from hypothesis import example, given, settings, strategies as st

import shadowkv_fx
from tests.models import ARCHS, assert_close, full_rank, left_padded, tiny_pair
from shadowkv_fx.compat import output_cache

CHUNK, LOCAL, OUTLIERS = 4, 2, 2
MIN_SPARSE = (LOCAL + OUTLIERS + 1) * CHUNK


def full_config(model) -> shadowkv_fx.ShadowKVConfig:
    return shadowkv_fx.ShadowKVConfig(
        sparse_budget=4096, rank=full_rank(model), chunk_size=CHUNK, local_chunks=LOCAL, outlier_chunks=OUTLIERS
    )


def generate_both(dense, model, ids, mask, new_tokens, **kwargs):
    with torch.no_grad():
        args = dict(attention_mask=mask, max_new_tokens=new_tokens, output_logits=True, return_dict_in_generate=True,
                    pad_token_id=0, **kwargs)
        expected = dense.generate(ids, **args)
        actual = model.generate(ids, **args)
    return expected, actual


def assert_same_generation(expected, actual, atol=2e-4):
    assert torch.equal(actual.sequences, expected.sequences), (actual.sequences, expected.sequences)
    for step, (a, e) in enumerate(zip(actual.logits, expected.logits)):
        assert_close(a, e, atol=atol, rtol=1e-4, what=f"logits at step {step}")


@pytest.mark.parametrize("arch", sorted(ARCHS))
@given(
    batch=st.integers(1, 3),
    base_len=st.integers(MIN_SPARSE, 90),
    pad=st.lists(st.integers(0, 17), min_size=3, max_size=3),
    kv_heads=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 2, 3]),
    head_dim=st.sampled_from([8, 16]),
    seed=st.integers(0, 2**16),
)
@example(batch=2, base_len=61, pad=[0, 7, 0], kv_heads=2, group=2, head_dim=16, seed=0)
def test_full_budget_full_rank_equals_dense(arch, batch, base_len, pad, kv_heads, group, head_dim, seed):
    dense, model = tiny_pair(arch, kv_heads=kv_heads, group=group, head_dim=head_dim, seed=seed, peaked=True)
    shadowkv_fx.optimize(model, full_config(model))
    lengths = [max(1, base_len - p) for p in pad[:batch]]
    ids, mask = left_padded(batch, lengths, dense.config.vocab_size, seed)
    expected, actual = generate_both(dense, model, ids, mask, new_tokens=5, do_sample=False)
    assert_same_generation(expected, actual)
    cache = output_cache(actual)
    assert isinstance(cache, shadowkv_fx.ShadowKVCache)
    compressed = [n >= MIN_SPARSE for n in lengths]
    assert cache.layers[0].state.compressed == any(compressed), "the sparse path must run, not a dense fallback"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_sampling_matches_dense_with_same_seed(attn):
    dense, model = tiny_pair("llama", attn=attn, seed=3, peaked=True)
    shadowkv_fx.optimize(model, full_config(model))
    ids, mask = left_padded(2, [40, 33], dense.config.vocab_size, seed=3)
    torch.manual_seed(11)
    with torch.no_grad():
        expected = dense.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=0, pad_token_id=0)
    torch.manual_seed(11)
    with torch.no_grad():
        actual = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=0, pad_token_id=0)
    assert torch.equal(actual, expected)


def test_every_selected_chunk_is_rebuilt_through_the_sparse_path(monkeypatch):
    """The full-budget equivalence must exercise selection + rebuild + value fetch, not skip them."""
    from shadowkv_fx.kernels import naive

    calls = {"rebuild": 0, "gather": 0}
    rebuild, gather = naive.rebuild_keys, naive.gather_value_chunks

    def counting_rebuild(*a):
        calls["rebuild"] += 1
        return rebuild(*a)

    def counting_gather(*a):
        calls["gather"] += 1
        return gather(*a)

    monkeypatch.setattr(naive, "rebuild_keys", counting_rebuild)
    monkeypatch.setattr(naive, "gather_value_chunks", counting_gather)
    dense, model = tiny_pair("llama")
    shadowkv_fx.optimize(model, full_config(model))
    ids, mask = left_padded(1, [64], dense.config.vocab_size)
    expected, actual = generate_both(dense, model, ids, mask, new_tokens=3, do_sample=False)
    assert_same_generation(expected, actual)
    layers, decode_steps = dense.config.num_hidden_layers, 2
    assert calls == {"rebuild": layers * decode_steps, "gather": layers * decode_steps}


def right_padded(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same prompts as a left-padded batch, padded on the right instead."""
    shift = (mask == 0).sum(dim=1)
    cols = torch.arange(ids.shape[1])
    index = (cols[None, :] + shift[:, None]) % ids.shape[1]
    return torch.gather(ids, 1, index), torch.gather(mask, 1, index)


@given(
    lengths=st.lists(st.integers(1, 70), min_size=2, max_size=3),
    sparse=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(lengths=[61, 23, 70], sparse=True, seed=0)
@settings(max_examples=3)
def test_right_padded_batch_gives_the_left_padded_tokens(lengths, sparse, seed):
    """Tokenizers that pad on the right (SmolLM2's) work: rows are re-aligned, same tokens as left padding."""
    dense, model = tiny_pair("llama", seed=seed, peaked=True)
    config = full_config(model)
    if sparse:
        config = shadowkv_fx.ShadowKVConfig(sparse_budget=CHUNK, rank=4, chunk_size=CHUNK, local_chunks=LOCAL,
                                            outlier_chunks=OUTLIERS)
    shadowkv_fx.optimize(model, config)
    ids, mask = left_padded(len(lengths), lengths, dense.config.vocab_size, seed)
    right_ids, right_mask = right_padded(ids, mask)
    args = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        left = model.generate(ids, attention_mask=mask, **args)
        right = model.generate(right_ids, attention_mask=right_mask, **args)
        full_logits = model(right_ids, attention_mask=right_mask).logits
        expected_logits = model(ids, attention_mask=mask).logits
    width = ids.shape[1]
    assert torch.equal(right.sequences[:, width:], left.sequences[:, width:])
    for step, (a, e) in enumerate(zip(right.logits, left.logits)):
        assert_close(a, e, atol=1e-5, rtol=1e-5, what=f"logits at step {step}")
    # a plain forward returns logits in the caller's (right-padded) layout
    real = right_mask.bool()
    assert_close(full_logits[real], expected_logits[mask.bool()], atol=1e-5, rtol=1e-5, what="prompt logits")
    if not sparse:
        with torch.no_grad():
            reference = dense.generate(ids, attention_mask=mask, **args)
        assert torch.equal(right.sequences[:, width:], reference.sequences[:, width:])
