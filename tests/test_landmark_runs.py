"""Issue #32: ``landmark_runs`` scores a chunk by finer landmarks inside it (the means of its runs),
with the top-k, rebuild and fetch still a chunk at a time."""
import copy
import pytest
import torch

import shadowkv_fx
from shadowkv_fx import decode_step
from shadowkv_fx.compat import output_cache
from shadowkv_fx.kernels import compression, naive, quantize
from tests.models import cuda_only, full_rank, left_padded, tiny_pair
from tests.test_equivalence import assert_same_generation, generate_both
from tests.test_span_select import needle_state


def test_run_landmarks_are_the_means_of_each_run_side_by_side():
    k = torch.randn(3, 6 * 8, 16, generator=torch.Generator().manual_seed(0))
    one, one_cos = compression.chunk_landmarks(k, 8)
    two, two_cos = compression.chunk_landmarks(k, 8, runs=2)
    assert one.shape == (3, 6, 16) and two.shape == (3, 6, 32)
    torch.testing.assert_close(two[:, :, :16], k.view(3, 6, 8, 16)[:, :, :4].mean(2))
    torch.testing.assert_close(two[:, :, 16:], k.view(3, 6, 8, 16)[:, :, 4:].mean(2))
    torch.testing.assert_close(two.view(3, 6, 2, 16).mean(2), one)  # runs of one length average to the chunk's mean
    assert torch.equal(two_cos, one_cos), "outliers are still chosen by the whole chunk's mean"


def _scores(q, keys, chunk, runs, bits=16):
    """``chunk_scores`` over the run landmarks of ``keys [B, Hkv, T, D]``, and those landmarks."""
    b, hkv, t, d = keys.shape
    landmarks = keys.view(b, hkv, t // chunk, runs, chunk // runs, d).mean(4).flatten(3)
    config = shadowkv_fx.ShadowKVConfig(sparse_budget=4 * chunk, chunk_size=chunk, landmark_runs=runs)
    selectable = torch.ones(b, hkv, t // chunk, dtype=torch.bool)
    selectable[0, 0, 2] = False
    scale = None
    if bits == 8:
        landmarks, scale = quantize.quantize(landmarks, 1)
    return decode_step.chunk_scores(q, landmarks, selectable, 0.5, scale, config), landmarks, scale, selectable


def test_single_token_runs_score_a_chunk_by_its_exact_attention_mass():
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(2, 2, 10 * 4, 8, generator=gen)
    q = torch.randn(2, 2, 1, 8, generator=gen) * 2  # one query head per KV head: no max over a group
    scores, _, _, selectable = _scores(q, keys, chunk=4, runs=4)
    logits = torch.einsum("bhnd,bhtd->bht", q, keys) * 0.5
    logits = logits.masked_fill(~selectable.repeat_interleave(4, -1), float("-inf"))
    mass = torch.softmax(logits, -1).view(2, 2, 10, 4).sum(-1).masked_fill(~selectable, float("-inf"))
    torch.testing.assert_close(scores, mass)


@pytest.mark.parametrize("bits", [16, 8])
def test_runs_score_as_landmarks_of_their_own_summed_per_chunk(bits):
    gen = torch.Generator().manual_seed(2)
    keys = torch.randn(1, 2, 12 * 8, 16, generator=gen)
    q = torch.randn(1, 6, 2, 16, generator=gen)  # a group of 3 heads, 2 tokens
    scores, landmarks, scale, selectable = _scores(q, keys, chunk=8, runs=2, bits=bits)
    per_run = landmarks.view(1, 2, 24, 16)
    run_scale = None if scale is None else scale.repeat_interleave(2, -1)
    want = naive.score_chunks(q, per_run, selectable.repeat_interleave(2, -1), 0.5, run_scale).view(1, 2, 12, 2).sum(-1)
    torch.testing.assert_close(scores, want)
    assert scores[0, 0, 2] == float("-inf") and torch.isfinite(scores[0, 1]).all()


@cuda_only
@pytest.mark.parametrize("bits", [16, 8])
def test_the_triton_scoring_of_runs_matches_the_reference(bits):
    gen = torch.Generator().manual_seed(5)
    keys = torch.randn(2, 8, 1000 * 8, 128, generator=gen).bfloat16().float()
    q = (torch.randn(2, 32, 1, 128, generator=gen) * 0.5).bfloat16()
    config = shadowkv_fx.ShadowKVConfig(chunk_size=8, landmark_runs=2)
    _, landmarks, scale, selectable = _scores(q.float(), keys, chunk=8, runs=2, bits=bits)
    if bits == 16:
        landmarks = landmarks.bfloat16()  # the reference reads the same rounded landmarks
    want = decode_step.chunk_scores(q.float(), landmarks.float() if bits == 16 else landmarks, selectable, 0.5,
                                    scale, config)
    got = decode_step.chunk_scores(q.cuda(), landmarks.cuda(), selectable.cuda(), 0.5,
                                   None if scale is None else scale.cuda(), config)
    assert torch.isfinite(want[0, 1]).all() and (want[0, 0, 2] == float("-inf"))
    torch.testing.assert_close(got.cpu(), want, atol=1e-6, rtol=2e-2)


def _needle_misses(runs: int) -> list[int]:
    """Offsets into chunk 10 (chunks of 8) at which a 7-token needle is not chosen whole, among 3
    distractor chunks scoring between its parts (``test_span_select.needle_state``)."""
    misses = []
    for offset in range(8):
        state, q, needed = needle_state(offset, span=0, runs=runs)
        idx, picked = decode_step.select(state, q, 1.0)
        if not needed <= set(idx[picked].tolist()):
            misses.append(offset)
    return misses


def test_finer_runs_keep_a_needle_cut_by_a_boundary_whole():
    assert _needle_misses(1) == [2, 3, 4, 5, 6, 7]  # one mean a chunk drops the smaller part
    assert _needle_misses(8) == [], "single-token runs see every needle token at its full score"
    assert _needle_misses(2) == [2, 7]  # runs of 4: only where the smaller part is 1 token


def folded_at_full_budget(**knob):
    """A full-budget, full-rank run (chunks of 4, folding every chunk) with ``knob`` checked token for token
    against dense; its first layer's state, whose row 0 has folded generated tokens into the store."""
    dense, model = tiny_pair("llama", kv_heads=2, group=2, head_dim=16, seed=4, peaked=True)
    config = shadowkv_fx.ShadowKVConfig(sparse_budget=4096, rank=full_rank(model), chunk_size=4, local_chunks=2,
                                        outlier_chunks=2, fold_chunks=1, **knob)
    shadowkv_fx.optimize(model, config)
    ids, mask = left_padded(2, [70, 57], dense.config.vocab_size, seed=4)
    expected, actual = generate_both(dense, model, ids, mask, new_tokens=14, do_sample=False)
    assert_same_generation(expected, actual)
    state = output_cache(actual).layers[0].state
    assert state.compressed and state.chunks[0] > 70 // 4 - 2, "generated tokens were folded into the store"
    return state


def test_full_budget_full_rank_with_runs_equals_dense_and_folds_keep_run_landmarks():
    assert folded_at_full_budget(landmark_runs=2).landmarks.shape[-1] == 2 * 16


def test_a_small_budget_with_runs_selects_by_the_summed_run_scores_end_to_end():
    _, model = tiny_pair("llama", seed=3, peaked=True)
    state = small_store_run(model, 4, landmark_runs=4, landmark_bits=8).layers[0].state
    b, hkv, c, width = state.landmarks.shape
    assert state.landmarks.dtype == torch.int8 and width == 4 * model.config.head_dim
    q = torch.randn(1, model.config.num_attention_heads, 1, model.config.head_dim,
                    generator=torch.Generator().manual_seed(0)) * 4
    idx, picked = decode_step.select(state, q, 0.25)
    runs = quantize.dequantize(state.landmarks, state.landmark_scale).view(b, hkv, c * 4, -1)
    scores = naive.score_chunks(q, runs.float(), state.selectable.repeat_interleave(4, -1), 0.25)
    want, want_picked = naive.top_chunks(scores.view(b, hkv, c, 4).sum(-1), state.select_k)
    assert torch.equal(idx.sort(-1).values, want.sort(-1).values) and torch.equal(picked, want_picked)


def test_landmark_runs_must_divide_the_chunk():
    with pytest.raises(ValueError, match="landmark_runs"):
        shadowkv_fx.ShadowKVConfig(chunk_size=8, landmark_runs=3)


def test_runs_multiply_the_landmark_bytes_in_the_preflight_and_the_memory_report():
    from shadowkv_fx import preflight
    from shadowkv_fx.prompt_layout import PromptLayout

    layout = PromptLayout([0], [1000], [1000 // 8 - 4], 1000)
    one, two = (shadowkv_fx.ShadowKVConfig(sparse_budget=64, rank=16, outlier_chunks=4, fold_chunks=None,
                                           landmark_runs=runs) for runs in (1, 2))
    hkv, d = 2, 16
    grown = [preflight.state_footprint(3, hkv, d, torch.float16, layout, c, 32).device for c in (one, two)]
    assert grown[1] - grown[0] == 3 * hkv * layout.max_chunks * d * 2, "one more landmark of D halves a chunk, layer"
    reports, _ = small_store_reports(tiny_pair("llama", seed=3, peaked=True)[1], {"landmark_runs": 1},
                                     {"landmark_runs": 2})
    assert reports[1]["landmarks"] == 2 * reports[0]["landmarks"] > 0
    assert reports[1]["U"] == reports[0]["U"]


def small_store_run(model, new_tokens: int, **knob):
    """The cache after a copy of ``model`` optimized with ``knob`` (config fields over a small store: chunks
    of 4, 4 selected) generates ``new_tokens`` after a 160-token prompt."""
    config = shadowkv_fx.ShadowKVConfig(sparse_budget=16, rank=8, chunk_size=4, local_chunks=2, outlier_chunks=2,
                                        **knob)
    fast = shadowkv_fx.optimize(copy.deepcopy(model), config)
    ids, mask = left_padded(1, [160], 96, seed=3)
    with torch.no_grad():
        out = fast.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                            do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    return output_cache(out)


def small_store_reports(model, *knobs: dict) -> tuple[list[dict], int]:
    """``memory_report()["cpu"]`` after ``small_store_run`` of 2 tokens at each of ``knobs``, and the chunks
    the last store holds per row."""
    caches = [small_store_run(model, 2, **knob) for knob in knobs]
    return [c.memory_report()["cpu"] for c in caches], caches[-1].layers[0].state.landmarks.shape[2]
