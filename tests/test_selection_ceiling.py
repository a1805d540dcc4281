"""``benchmarks/selection_ceiling.py`` (#32): its oracle must see the keys a step would rebuild
and pick by exact attention mass, or its ceiling reads wrong."""
import copy
import importlib.util
from pathlib import Path

import torch

import shadowkv_fx
from shadowkv_fx import decode_step
from shadowkv_fx.compat import output_cache
from shadowkv_fx.kernels import dispatch, naive
from tests.models import tiny_pair

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "selection_ceiling.py"
_SPEC = importlib.util.spec_from_file_location("selection_ceiling", _PATH)
ceiling = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ceiling)


CONFIG = shadowkv_fx.ShadowKVConfig(sparse_budget=16, rank=32, chunk_size=4, local_chunks=2, outlier_chunks=2)


def _layer_state():
    """A compressed layer (full rank) of a tiny Llama after a 96-token prompt, and that layer's dense keys."""
    dense, model = tiny_pair("llama", seed=5, kv_heads=2, head_dim=16)
    ids = torch.randint(3, 96, (1, 96), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = dense(ids, use_cache=True).past_key_values.layers[1].keys  # [1, Hkv, T, D], post-RoPE
        fast = shadowkv_fx.optimize(copy.deepcopy(model), CONFIG)
        out = fast.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, min_new_tokens=2,
                            do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    return output_cache(out).layers[1].state, want


def test_all_keys_are_the_dense_models_post_rope_keys_at_full_rank():
    state, want = _layer_state()
    keys = ceiling.all_keys(state)
    # every chunk a step may select (outliers and the local window are attended from the buffer)
    selectable = state.selectable.repeat_interleave(CONFIG.chunk_size, -1)[..., : want.shape[2]]
    assert selectable.sum() >= 2 * 64, "most of the prompt is selectable"
    torch.testing.assert_close(keys[:, :, : want.shape[2]][selectable], want.float()[selectable], atol=2e-4, rtol=1e-4)


def test_rescoring_every_candidate_is_the_oracle_and_landmarks_is_shadowkvs_own_select():
    state, _ = _layer_state()
    q = torch.randn(1, 4, 1, 16, generator=torch.Generator().manual_seed(1)) * 3
    oracle_idx, oracle_picked = ceiling.selector("oracle")(state, q, 0.25)
    wide_idx, wide_picked = ceiling.selector("rescore1000")(state, q, 0.25)
    assert torch.equal(wide_picked, oracle_picked)
    assert torch.equal(wide_idx.sort(-1).values, oracle_idx.sort(-1).values)
    narrow_idx, _ = ceiling.selector("rescore1")(state, q, 0.25)  # as many candidates as picks: the landmarks' own
    landmark_idx, _ = decode_step.select(state, q, 0.25)
    assert torch.equal(narrow_idx.sort(-1).values, landmark_idx.sort(-1).values)
    assert not torch.equal(landmark_idx.sort(-1).values, oracle_idx.sort(-1).values), "this query tells them apart"
    assert ceiling.selector("landmarks") is decode_step.select


def test_step_mass_ranks_chunks_by_exact_attention_and_skips_unselectable_ones():
    chunk, d = 4, 8
    keys = torch.zeros(1, 1, 5 * chunk, d)
    keys[0, 0, 2 * chunk + 1, 0] = 6.0  # one strong key in chunk 2
    keys[0, 0, 4 * chunk : 5 * chunk, 0] = 2.0  # four lukewarm keys in chunk 4: more mass than any other but 2
    keys[0, 0, 0, 0] = 9.0  # the strongest key, in chunk 0, which is not selectable
    keys[0, 0, 3 * chunk + 2, 1] = 6.0  # what the group's second query head looks for, in chunk 3
    real = torch.tensor([[[False, True, True, True, True]]])
    q = torch.zeros(1, 2, 1, d)
    q[0, 0, 0, 0] = 1.0
    q[0, 1, 0, 1] = 1.0
    one_head = ceiling.step_mass(q[:, :1], keys, real, chunk, 1.0)
    assert one_head[0, 0, 0] == float("-inf")
    assert one_head[0, 0].argsort(descending=True)[:2].tolist() == [2, 4]
    exact = torch.softmax(keys[0, 0, chunk:, 0], 0).view(4, chunk).sum(-1)  # over the selectable tokens
    torch.testing.assert_close(one_head[0, 0, 1:], exact)
    group = ceiling.step_mass(q, keys, real, chunk, 1.0)  # a GQA group keeps each head's best chunk
    assert sorted(group[0, 0].argsort(descending=True)[:2].tolist()) == [2, 3]


def test_radius_scores_at_weight_zero_are_shadowkvs_and_a_spread_chunk_rises_with_the_weight():
    chunk, d = 4, 8
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, 6 * chunk, d, generator=gen)
    keys[0, :, 3 * chunk : 4 * chunk] *= 6  # a spread-out chunk
    landmarks = keys.view(1, 2, 6, chunk, d).mean(3)
    selectable = torch.ones(1, 2, 6, dtype=torch.bool)
    selectable[0, 1, 0] = False
    q = torch.randn(1, 4, 1, d, generator=gen)
    plain = naive.score_chunks(q, landmarks, selectable, 0.5)
    torch.testing.assert_close(ceiling.radius_scores(q, landmarks, keys, selectable, chunk, 0.5, 0.0), plain)
    lifted = ceiling.radius_scores(q, landmarks, keys, selectable, chunk, 0.5, 1.0)
    assert (lifted[..., 3] > plain[..., 3]).all() and lifted[0, 1, 0] == float("-inf")


def test_an_unknown_mode_is_refused_before_any_work():
    try:
        ceiling.selector("best")
    except ValueError as err:
        assert "unknown mode" in str(err)
    else:
        raise AssertionError("an unknown mode was accepted")


def test_key_codes_round_each_channel_within_its_group_and_enough_bits_pick_as_the_oracle():
    gen = torch.Generator().manual_seed(3)
    keys = torch.randn(1, 2, 70, 8, generator=gen) * torch.linspace(0.1, 20, 8)  # channels of very different spread
    for bits in (2, 4, 8):
        coded = ceiling.key_codes(keys, bits)
        assert coded.shape == keys.shape
        for start in (0, 32, 64):  # the last group is 6 tokens long
            group = keys[:, :, start : start + 32]
            step = (group.amax(2) - group.amin(2)) / (2**bits - 1)
            err = (coded[:, :, start : start + 32] - group).abs().amax(2)
            assert (err <= step / 2 + 1e-5).all(), f"{bits} bits: a code is off by more than half a step"
            assert len(torch.unique(coded[0, 0, start : start + 32, 7])) <= 2**bits
    state, _ = _layer_state()
    q = torch.randn(1, 4, 1, 16, generator=torch.Generator().manual_seed(1)) * 3
    oracle_idx, _ = ceiling.selector("oracle")(state, q, 0.25)
    for mode in ("codes12", "codes12g0"):  # groups of 32 tokens; one group for the whole prompt
        fine_idx, _ = ceiling.selector(mode)(state, q, 0.25)
        assert torch.equal(fine_idx.sort(-1).values, oracle_idx.sort(-1).values), mode
    coarse_idx, _ = ceiling.selector("codes1g0")(state, q, 0.25)
    assert not torch.equal(coarse_idx.sort(-1).values, oracle_idx.sort(-1).values), "one bit a channel loses picks"


def test_sub_landmarks_of_single_tokens_are_the_oracle_and_of_whole_chunks_shadowkvs_score():
    state, _ = _layer_state()
    q = torch.randn(1, 4, 1, 16, generator=torch.Generator().manual_seed(1)) * 3
    oracle_idx, _ = ceiling.selector("oracle")(state, q, 0.25)
    single_idx, _ = ceiling.selector("sub1")(state, q, 0.25)
    assert torch.equal(single_idx.sort(-1).values, oracle_idx.sort(-1).values)
    whole_idx, _ = ceiling.selector("sub4")(state, q, 0.25)  # one mean a chunk: the landmark at full rank
    keys = ceiling.all_keys(state)
    means = keys.view(*keys.shape[:2], -1, CONFIG.chunk_size, keys.shape[-1]).mean(3)
    want_idx, _ = dispatch.top_chunks(naive.score_chunks(q, means, state.selectable, 0.25), state.select_k)
    assert torch.equal(whole_idx.sort(-1).values, want_idx.sort(-1).values)
    try:
        ceiling.selector("sub3")(state, q, 0.25)
    except ValueError as err:
        assert "whole runs" in str(err)
    else:
        raise AssertionError("a run length that does not divide the chunk was accepted")


def test_pca_codes_in_every_direction_pick_as_the_oracle_and_in_one_direction_do_not():
    """Centring costs each query one constant logit (the softmax cancels it), so every direction at 12 bits picks
    the oracle's chunks; one direction of 16 cannot."""
    state, _ = _layer_state()
    q = torch.randn(1, 4, 1, 16, generator=torch.Generator().manual_seed(1)) * 3
    oracle_idx, _ = ceiling.selector("oracle")(state, q, 0.25)
    full_idx, _ = ceiling.selector("pca16codes12")(state, q, 0.25)
    assert torch.equal(full_idx.sort(-1).values, oracle_idx.sort(-1).values)
    basis, coded = ceiling.pca_codes(ceiling.all_keys(state), 3, 4)
    assert basis.shape[-1] == 3 and coded.shape[-1] == 3
    assert torch.allclose(basis.transpose(-1, -2) @ basis, torch.eye(3).expand(1, 2, 3, 3), atol=1e-5)
    one_idx, _ = ceiling.selector("pca1codes12")(state, q, 0.25)
    assert not torch.equal(one_idx.sort(-1).values, oracle_idx.sort(-1).values), "one direction of 16 loses picks"
