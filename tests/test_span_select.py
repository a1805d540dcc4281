"""Issue #32: ``span_neighbors`` selection keeps a span cut by a chunk boundary whole."""
import copy
from types import SimpleNamespace

import pytest
import torch

import shadowkv_fx
from shadowkv_fx import decode_step
from shadowkv_fx.compat import output_cache
from shadowkv_fx.kernels import key_codes, naive
from tests.models import left_padded, tiny_pair


def reference_keys(scores: torch.Tensor, selectable: torch.Tensor, n: int) -> list[list[list[tuple]]]:
    """Independent of ``widen_spans``: per chunk, (best selectable score within n chunks, -distance to
    it); a masked chunk's key is None."""
    b, h, c = scores.shape
    out = []
    for i in range(b):
        rows = []
        for j in range(h):
            keys = []
            for x in range(c):
                if not selectable[i, j, x]:
                    keys.append(None)
                    continue
                near = [(float(scores[i, j, y]), -abs(x - y)) for y in range(max(0, x - n), min(c, x + n + 1))
                        if selectable[i, j, y]]
                keys.append(max(near))
            rows.append(keys)
        out.append(rows)
    return out


@pytest.mark.parametrize("n", [1, 2, 3])
def test_widened_top_k_picks_what_an_independent_ranking_picks(n):
    gen = torch.Generator().manual_seed(n)
    b, h, c, k = 2, 3, 37, 9
    scores = torch.rand(b, h, c, generator=gen)
    selectable = torch.rand(b, h, c, generator=gen) > 0.25
    selectable[1, 2] = False
    selectable[1, 2, [3, 4, 20]] = True  # fewer selectable than k: all of them, the rest not picked
    scores = scores.masked_fill(~selectable, float("-inf"))
    idx, picked = naive.top_chunks(decode_step.widen_spans(scores, selectable, n), k)
    keys = reference_keys(scores, selectable, n)
    for i in range(b):
        for j in range(h):
            real = idx[i, j][picked[i, j]].tolist()
            assert len(set(real)) == len(real), "no chunk twice"
            assert all(selectable[i, j, x] for x in real), "a masked chunk is never picked"
            ranked = sorted((key for key in keys[i][j] if key is not None), reverse=True)
            assert len(real) == min(k, len(ranked))
            # ties (two neighbours of one peak at one distance) may go either way: compare the keys
            assert sorted((keys[i][j][x] for x in real), reverse=True) == ranked[:k], (i, j)


def test_a_spike_takes_its_neighbours_within_the_same_budget():
    c, k = 30, 6
    scores = torch.linspace(0.1, 0.2, c).repeat(1, 2, 1)
    selectable = torch.ones(1, 2, c, dtype=torch.bool)
    scores[0, :, 12] = 5.0
    scores[0, 1, 17] = 4.0
    selectable[0, 1, 16] = False  # a masked neighbour stays out; the chunk past it is not lifted from it
    scores = scores.masked_fill(~selectable, float("-inf"))
    plain, _ = naive.top_chunks(scores, k)
    idx, picked = naive.top_chunks(decode_step.widen_spans(scores, selectable, 1), k)
    assert picked.all() and idx.shape[-1] == k
    assert {11, 13}.isdisjoint(plain[0, 0].tolist()), "without the knob the neighbours are not chosen"
    assert {11, 12, 13} <= set(idx[0, 0].tolist())
    assert {11, 12, 13, 17, 18} <= set(idx[0, 1].tolist()) and 16 not in idx[0, 1].tolist()
    # the other slots go to the best plain chunks (28 lifted by 29, 27 by 28), none far from a high one
    assert set(idx[0, 0].tolist()) == {11, 12, 13, 29, 28, 27}
    assert int(torch.argmax(decode_step.widen_spans(scores, selectable, 1)[0, 0])) == 12, "the peak ranks first"


def needle_state(offset: int, span: int, length: int = 7, chunk: int = 8, chunks: int = 32, runs: int = 1,
                 codes: bool = False):
    """One KV head whose query finds a needle of ``length`` tokens starting ``offset`` tokens into
    chunk 10, and 3 distractor chunks that each score between the needle's smaller and larger part
    whenever a boundary cuts it; ``runs`` landmarks a chunk (``landmark_runs``), or with ``codes``
    every key's 4-bit codes (``key_code_bits=4``)."""
    d = 16
    gen = torch.Generator().manual_seed(offset)
    keys = torch.randn(chunks * chunk, d, generator=gen) * 0.05
    axis = torch.zeros(d)
    axis[0] = 1.0
    start = 10 * chunk + offset
    keys[start : start + length] += 8 * axis
    for distractor in (3, 20, 27):
        keys[distractor * chunk : (distractor + 1) * chunk] += 3.5 * axis
    landmarks = keys.view(1, 1, chunks, runs, chunk // runs, d).mean(4).flatten(3)
    code_scale = key_codes.fit_scale(keys[None, None]) if codes else None
    if codes:
        landmarks = key_codes.encode(keys[None, None], code_scale, chunk)
    config = shadowkv_fx.ShadowKVConfig(sparse_budget=4 * chunk, chunk_size=chunk, span_neighbors=span,
                                        landmark_runs=runs, key_code_bits=4 if codes else 0)
    state = SimpleNamespace(landmarks=landmarks, landmark_scale=None, select_k=config.budget_chunks, config=config,
                            selectable=torch.ones(1, 1, chunks, dtype=torch.bool), code_scale=code_scale)
    needed = set(range(start // chunk, (start + length - 1) // chunk + 1))
    return state, (2 * axis).view(1, 1, 1, d), needed


def test_a_needle_at_every_offset_across_a_boundary_is_chosen_whole_with_neighbours():
    misses_without = []
    for offset in range(8):
        for span in (0, 1):
            state, q, needed = needle_state(offset, span)
            idx, picked = decode_step.select(state, q, 1.0)
            chosen = set(idx[picked].tolist())
            if span:
                assert needed <= chosen, f"offset {offset}: {sorted(needed)} not in {sorted(chosen)}"
            elif not needed <= chosen:
                misses_without.append(offset)
    # plain top-k (4 chunks: 3 distractors + the needle's larger part) drops the smaller part whenever
    # the boundary leaves it fewer than 3.5 of 8 needle tokens: offsets 2..7 of a 7-token needle
    assert misses_without == [2, 3, 4, 5, 6, 7]


def test_end_to_end_knob_off_is_plain_top_k_and_on_widens_the_choice():
    _, model = tiny_pair("llama", seed=3, peaked=True)
    base = shadowkv_fx.ShadowKVConfig(sparse_budget=16, rank=8, chunk_size=4, local_chunks=2, outlier_chunks=2)
    ids, mask = left_padded(1, [160], 96, seed=3)
    outs = {}
    for span in (0, 1):
        fast = shadowkv_fx.optimize(copy.deepcopy(model), shadowkv_fx.ShadowKVConfig(**{**base.to_dict(),
                                                                                       "span_neighbors": span}))
        with torch.no_grad():
            outs[span] = fast.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                       return_dict_in_generate=True, pad_token_id=0)
        state = output_cache(outs[span]).layers[0].state
        q = torch.randn(1, model.config.num_attention_heads, 1, model.config.head_dim,
                        generator=torch.Generator().manual_seed(0)) * 4
        idx, picked = decode_step.select(state, q, 0.25)
        scores = naive.score_chunks(q, state.landmarks, state.selectable, 0.25)
        if span:
            scores = decode_step.widen_spans(scores, state.selectable, span)
        want, want_picked = naive.top_chunks(scores, state.select_k)
        assert torch.equal(idx.sort(-1).values, want.sort(-1).values) and torch.equal(picked, want_picked), span
    assert outs[0].sequences.shape == outs[1].sequences.shape


def test_widen_spans_compiles_with_inductor_to_the_same_values():
    gen = torch.Generator().manual_seed(7)
    scores = torch.rand(2, 3, 41, generator=gen)
    selectable = torch.rand(2, 3, 41, generator=gen) > 0.3
    scores = scores.masked_fill(~selectable, float("-inf"))
    compiled = torch.compile(decode_step.widen_spans, backend="inductor", fullgraph=True)
    assert torch.equal(compiled(scores, selectable, 2), decode_step.widen_spans(scores, selectable, 2))


def test_span_neighbors_must_be_a_non_negative_int():
    with pytest.raises(ValueError, match="span_neighbors"):
        shadowkv_fx.ShadowKVConfig(span_neighbors=-1)
    with pytest.raises(ValueError, match="span_neighbors"):
        shadowkv_fx.ShadowKVConfig(span_neighbors=1.5)
