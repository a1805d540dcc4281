"""Several new tokens in one forward on a compressed cache (a question asked of a stored document,
speculative drafts) compute what decoding them one at a time computes: each token selects its own
chunks and sees the tail up to itself (``decode_step.attend_earlier``), and the cache is left as
one-at-a-time decoding leaves it."""
import copy
import dataclasses

import pytest
import torch

import shadowkv_fx
from shadowkv_fx import decode_step
from tests.models import assert_close, cuda_only, left_padded, tiny_pair

SPARSE = shadowkv_fx.ShadowKVConfig(sparse_budget=16, rank=8, chunk_size=4, local_chunks=2, outlier_chunks=2)
CASES = {
    "plain": {},
    "spans": {"span_neighbors": 1},
    "8-bit": {"value_bits": 8, "landmark_bits": 8},
    "folding": {"fold_chunks": 1},
    "picks past a row": {"sparse_budget": 64},  # 16 picks; the 60-token row has 11 chunks to select
}
LENGTHS = {"picks past a row": [150, 60]}
BEFORE = {"folding": 12}  # tokens decoded first: a fold then hides row 0's first tail slots (tail_first)


def forward(model, cache, ids):
    with torch.no_grad():
        return model(input_ids=ids, past_key_values=cache, use_cache=True).logits


@pytest.mark.parametrize("group_bytes", [1, decode_step._GROUP_BYTES], ids=["a token a group", "one group"])
@pytest.mark.parametrize("case", list(CASES))
def test_tokens_at_once_equal_tokens_one_at_a_time(case, group_bytes, monkeypatch):
    monkeypatch.setattr(decode_step, "_GROUP_BYTES", group_bytes)
    at_once_equals_one_at_a_time(case, "cpu", 2e-5)


@cuda_only
@pytest.mark.parametrize("case", list(CASES))
def test_on_the_gpu_tokens_at_once_equal_tokens_one_at_a_time(case):
    """The Triton kernels score, rebuild and gather for the tokens through zero-stride views of the
    row's store (values in pinned host memory), as they do for ``repeat_rows``."""
    at_once_equals_one_at_a_time(case, "cuda", 1e-4)


def at_once_equals_one_at_a_time(case: str, device: str, tol: float) -> None:
    _, model = tiny_pair("llama", seed=3, peaked=True)
    model = model.to(device)
    config = dataclasses.replace(SPARSE, **CASES[case], value_hbm_gib=0)
    shadowkv_fx.optimize(model, config)
    ids, mask = (t.to(device) for t in left_padded(2, LENGTHS.get(case, [150, 117]), 96, seed=3))
    cache = shadowkv_fx.ShadowKVCache(model.config.num_hidden_layers, config)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    state = cache.layers[0].state
    assert state.compressed
    if case in LENGTHS:
        assert int(state.selectable[1, 0].sum()) < state.select_k, "row 1 has fewer chunks than a step picks"
    for step in range(BEFORE.get(case, 0)):
        forward(model, cache, torch.full((2, 1), 7 + step, device=device))
    if case in BEFORE:
        assert state.tail_first.any(), "the case folds before the tokens come"
    twin = copy.deepcopy(cache)
    new = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(3)).to(device)
    at_once = forward(model, cache, new)
    one_by_one = torch.cat([forward(model, twin, new[:, i : i + 1]) for i in range(new.shape[1])], dim=1)
    assert_close(at_once, one_by_one, atol=tol, rtol=tol, what=f"{case}: logits of the 7 tokens")
    # the cache is left as one-at-a-time decoding leaves it: the next steps agree too
    for step in range(3):
        token = torch.full((2, 1), 5 + step, device=device)
        assert_close(forward(model, cache, token), forward(model, twin, token), atol=tol, rtol=tol,
                     what=f"{case}: step {step} after")


def test_earlier_tokens_write_nothing_into_the_state(monkeypatch):
    """The copies ``attend_earlier`` fills are its own: the state's buffers hold what the newest
    token's step wrote (its selected chunks), whatever the earlier tokens selected."""
    _, model = tiny_pair("llama", seed=4, peaked=True)
    shadowkv_fx.optimize(model, SPARSE)
    ids = torch.randint(3, 96, (1, 140), generator=torch.Generator().manual_seed(4))
    cache = shadowkv_fx.ShadowKVCache(model.config.num_hidden_layers, SPARSE)
    forward(model, cache, ids)
    state = cache.layers[0].state
    before = {name: getattr(state, name).clone() for name in ("key_valid", "landmarks", "u", "v_chunks")}
    calls = []
    real = decode_step.attend_earlier
    monkeypatch.setattr(decode_step, "attend_earlier", lambda *a: calls.append(a[1].shape[2]) or real(*a))
    forward(model, cache, torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(5)))
    assert calls and set(calls) == {4}, "the four tokens before the newest went through attend_earlier"
    for name in ("landmarks", "u", "v_chunks"):
        assert torch.equal(getattr(state, name), before[name]), f"{name} written"
    region = slice(state.sel_start, state.local_start)
    outside = torch.ones(state.key_valid.shape[-1], dtype=torch.bool)
    outside[region] = False
    assert torch.equal(state.key_valid[..., outside], before["key_valid"][..., outside]), "key_valid outside the picks"
