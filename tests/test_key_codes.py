"""Issue #32: ``key_code_bits=4`` ranks chunks by the attention mass of every key's 4-bit codes
(``kernels/key_codes.py``, ``naive.score_code_chunks``, ``triton_code_score``) instead of landmarks.

The Triton kernel runs under TRITON_INTERPRET=1 on the CPU (small shapes), on the GPU with 8B shapes."""
import os
from unittest import mock

import pytest
import torch
from hypothesis import given, settings, strategies as st

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

import shadowkv_fx  # noqa: E402
from shadowkv_fx import decode_step, preflight  # noqa: E402
from shadowkv_fx.kernels import key_codes, naive, triton_code_score, triton_score  # noqa: E402
from shadowkv_fx.prompt_layout import PromptLayout  # noqa: E402
from tests.models import assert_close, cuda_only, skip_unless_kernels_run_here, tiny_pair  # noqa: E402
from tests.test_landmark_runs import folded_at_full_budget, small_store_reports, small_store_run  # noqa: E402
from tests.test_span_select import needle_state  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
skip_unless_kernels_run_here(triton_code_score.code_logits_kernel)


def test_codes_round_each_channel_to_16_levels_of_its_range_packed_two_to_a_byte():
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(3, 5 * 4, 8, generator=gen) * torch.linspace(0.1, 10, 8)  # channels of very different range
    scale = key_codes.fit_scale(keys)
    codes = key_codes.encode(keys, scale, 4)
    assert codes.shape == (3, 5, 4 * 8 // 2) and codes.dtype == torch.uint8
    step, low = scale[:, 0], scale[:, 1]
    torch.testing.assert_close(step, (keys.amax(1) - keys.amin(1)) / 15)
    back = key_codes.decode(codes, scale, 4)
    assert ((back - keys).abs() <= step[:, None] / 2 + 1e-5).all(), "each key within half its channel's step"
    # byte i of a token: channel i in the low nibble, channel i + D/2 in the high one
    want = ((keys - low[:, None]) / step[:, None]).round().to(torch.uint8)
    first = codes[0, 0, :4]
    assert torch.equal(first & 15, want[0, 0, :4]) and torch.equal(first >> 4, want[0, 0, 4:])
    # a fold's keys past the prompt's range take the nearest code
    far = key_codes.decode(key_codes.encode(keys * 3, scale, 4), scale, 4)
    assert far.amax(1).le(keys.amax(1) + 1e-5).all() and far.amin(1).ge(keys.amin(1) - 1e-5).all()


def test_scores_are_the_exact_attention_mass_of_the_keys_the_codes_stand_for():
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(2, 2, 10 * 4, 16, generator=gen)
    scale = key_codes.fit_scale(keys)
    codes = key_codes.encode(keys, scale, 4)
    q = torch.randn(2, 6, 2, 16, generator=gen)  # groups of 3 heads, 2 tokens
    selectable = torch.rand(2, 2, 10, generator=gen) > 0.3
    scores = naive.score_code_chunks(q, codes, scale, selectable, 0.5)
    back = key_codes.decode(codes, scale, 4)
    logits = torch.einsum("bhgnd,bhtd->bhgnt", q.view(2, 2, 3, 2, 16), back) * 0.5
    logits = logits.masked_fill(~selectable.repeat_interleave(4, -1)[:, :, None, None], float("-inf"))
    mass = logits.softmax(-1).view(2, 2, 3, 2, 10, 4).sum(-1).sum(3).amax(2)
    torch.testing.assert_close(scores, mass.masked_fill(~selectable, float("-inf")))


def nan_scratch(*size, **kwargs):
    return torch.empty(*size, **kwargs).fill_(float("nan"))


def check_code_scores(b, hkv, g, n, c, chunk, d, dtype, seed, shared_row=False, empty_rows=0, tol=None):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, hkv, c * chunk, d, generator=gen) * (1 + torch.rand(d, generator=gen) * 4)
    scale = key_codes.fit_scale(keys)
    codes = key_codes.encode(keys, scale, chunk)
    q = (torch.randn(b, n, hkv * g, d, generator=gen) * 2).to(dtype).transpose(1, 2)  # as the model leaves it
    selectable = torch.rand(b, hkv, c, generator=gen) > 0.2
    selectable[b - empty_rows :] = False  # a sequence too short to compress
    if shared_row:  # rows reading one document's store through a zero batch stride (decode_step.attend_earlier)
        codes, scale, selectable = (t[:1].expand(b, *t.shape[1:]) for t in (codes, scale, selectable))
    expected = naive.score_code_chunks(q.float(), codes, scale, selectable, d**-0.5)
    with mock.patch.object(triton_score, "_scratch", nan_scratch):
        got = triton_code_score.score_code_chunks(q.to(DEVICE), codes.to(DEVICE), scale.to(DEVICE),
                                                  selectable.to(DEVICE), d**-0.5).cpu()
    assert not got.isnan().any() and torch.equal(torch.isinf(got), ~selectable)
    tol = tol or (1e-5 if dtype == torch.float32 else 2e-2)
    assert_close(got, expected, atol=tol * max(1e-3, expected.nan_to_num(0.0, 0.0, 0.0).abs().max().item()), rtol=tol,
                 what=f"code scores b={b} hkv={hkv} g={g} n={n} c={c} chunk={chunk} d={d}")


DOT_CASES = {"fp32_dots": (False, "fp16"), "fp16_dots": (True, "fp16"), "fp16_nibble_bits": (True, "fp16_bits"),
             "int8x2_dots": (True, "int8x2"), "fp32_token_rows": (False, "fp16_tokens"),
             "fp16_token_rows": (True, "fp16_tokens"), "int8x2_token_rows": (True, "int8x2_tokens"),
             "fp16_asm_base2": (True, "fp16_asm"), "fp16_asm_phases": (True, "fp16_asm_phases"),
             "fp16_asm_phases_token_rows": (True, "fp16_asm_phases_tokens")}


@pytest.mark.parametrize("gpu_dots, form", list(DOT_CASES.values()), ids=list(DOT_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), b=st.sampled_from([1, 3]), hkv=st.sampled_from([1, 2]),
       g=st.sampled_from([1, 3]), n=st.sampled_from([1, 2]), c=st.sampled_from([1, 37, 150]),
       chunk=st.sampled_from([2, 4, 8]), d=st.sampled_from([16, 64]), shared_row=st.booleans())
def test_triton_code_scores_match_the_reference(gpu_dots, form, dtype, seed, b, hkv, g, n, c, chunk, d,
                                                shared_row):
    """``gpu_dots``: the GPU's path for 16-bit models, run by the interpreter too, in each of its ``GPU_TILES["dot"]``
    forms (fp16 nibbles converted or made by bits, or int8 dots of a query split in two; ``fp16_asm``'s PTX unpacking
    runs on a GPU only, its bits and base-2 log-sum-exp here)."""
    with mock.patch.object(triton_code_score, "GPU_DOTS_OFF_GPU", gpu_dots), \
            mock.patch.dict(triton_code_score.GPU_TILES, dot=form):
        # int8x2 keeps the query to 1/64516 of its largest channel: tighter than an fp16 rounding
        check_code_scores(b, hkv, g, n, c, chunk, d, dtype, seed, shared_row, empty_rows=1 if b > 1 else 0,
                          tol=1e-3 if gpu_dots and form.startswith("int8x2") else None)


@cuda_only
@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("chunk", [4, 8])
def test_triton_code_scores_llama8b_shapes_on_gpu(n, chunk):
    check_code_scores(2, 8, 4, n, 30000 // chunk, chunk, 128, torch.bfloat16, seed=n + chunk, empty_rows=1)


def test_the_kernel_refuses_codes_it_cannot_tile():
    q = torch.zeros(1, 2, 1, 16)
    selectable = torch.ones(1, 2, 3, dtype=torch.bool)
    scale = torch.ones(1, 2, 2, 16)
    with pytest.raises(ValueError, match="uint8"):
        triton_code_score.score_code_chunks(q, torch.zeros(1, 2, 3, 6 * 8, dtype=torch.uint8), scale, selectable, 1.0)
    with pytest.raises(ValueError, match="code_scale"):
        triton_code_score.score_code_chunks(q, torch.zeros(1, 2, 3, 4 * 8, dtype=torch.uint8), scale[..., :8],
                                            selectable, 1.0)


def test_codes_choose_a_needle_cut_by_a_boundary_whole_at_every_offset():
    for offset in range(8):
        state, q, needed = needle_state(offset, span=0, codes=True)
        idx, picked = decode_step.select(state, q, 1.0)
        assert needed <= set(idx[picked].tolist()), f"offset {offset}"


def test_full_budget_full_rank_with_codes_equals_dense_through_folds():
    state = folded_at_full_budget(key_code_bits=4)
    assert state.landmarks.dtype == torch.uint8 and state.landmarks.shape[-1] == 4 * 16 // 2
    # a folded chunk's codes are its keys' (rebuilt exactly at full rank) under the row's prompt scales
    folded = torch.arange(state.prompt_chunks[0], state.chunks[0])
    cos, sin = (t[:1] for t in state.rope_tables)
    keys = naive.rebuild_rope_keys(state.u[:1], state.sv[:1], folded.expand(1, 2, -1), 4, state.pad[:1], cos, sin,
                                   state.rope_form, torch.float32)
    same = state.landmarks[:1, :, folded] == key_codes.encode(keys, state.code_scale[:1], 4)
    assert same.float().mean() > 0.97, "folded chunks carry their keys' codes"


def test_a_small_budget_with_codes_picks_the_chunks_of_most_coded_mass_end_to_end():
    _, model = tiny_pair("llama", seed=3, peaked=True)
    state = small_store_run(model, 4, key_code_bits=4).layers[0].state
    assert state.code_scale.shape == (1, model.config.num_key_value_heads, 2, model.config.head_dim)
    q = torch.randn(1, model.config.num_attention_heads, 1, model.config.head_dim,
                    generator=torch.Generator().manual_seed(0)) * 4
    idx, picked = decode_step.select(state, q, 0.25)
    keys = key_codes.decode(state.landmarks, state.code_scale, 4)
    logits = torch.einsum("bhgd,bhtd->bhgt", q.view(1, keys.shape[1], -1, keys.shape[-1]), keys) * 0.25
    logits = logits.masked_fill(~state.selectable.repeat_interleave(4, -1)[:, :, None], float("-inf"))
    mass = logits.softmax(-1).unflatten(-1, (-1, 4)).sum(-1).amax(2).masked_fill(~state.selectable, float("-inf"))
    want, want_picked = naive.top_chunks(mass, state.select_k)
    assert torch.equal(idx.sort(-1).values, want.sort(-1).values) and torch.equal(picked, want_picked)


def test_codes_refuse_the_knobs_that_shape_landmarks():
    for bad in ({"key_code_bits": 8}, {"key_code_bits": 4, "landmark_runs": 2},
                {"key_code_bits": 4, "landmark_bits": 8}, {"key_code_bits": 4, "dense_fallback_recall": 0.5}):
        with pytest.raises(ValueError, match="key_code_bits"):
            shadowkv_fx.ShadowKVConfig(**bad)


def test_codes_take_half_a_byte_a_key_channel_in_the_preflight_and_the_memory_report():
    layout = PromptLayout([0], [1000], [1000 // 8 - 4], 1000)
    means, codes = (shadowkv_fx.ShadowKVConfig(sparse_budget=64, rank=16, outlier_chunks=4, fold_chunks=None,
                                               key_code_bits=bits) for bits in (0, 4))
    hkv, d, c = 2, 16, layout.max_chunks
    sizes = [preflight.state_footprint(3, hkv, d, torch.float16, layout, cfg, 32).device for cfg in (means, codes)]
    assert sizes[1] - sizes[0] == 3 * (hkv * c * 8 * d // 2 + hkv * 2 * d * 4 - hkv * c * d * 2)
    _, model = tiny_pair("llama", seed=3, peaked=True)
    reports, store = small_store_reports(model, {"key_code_bits": 0}, {"key_code_bits": 4})
    cfg = model.config
    layers, hkv, d = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    assert reports[1]["landmarks"] == layers * hkv * (store * 4 * d // 2 + 2 * d * 4)
    assert reports[0]["landmarks"] == layers * hkv * store * d * 4  # float32 means


def test_slots_with_codes_give_each_request_the_tokens_and_logits_it_gets_alone():
    """A prompt prefilled alone joins a running cache's slot with its code scales (``slot_state.adopt_row``)."""
    from tests.test_serving_shadowkv import MAX_LENGTH, LogitRecorder, prompt_of, serve, shared, sparse_config
    from shadowkv_fx.cache import ShadowKVCache

    _, model = shared()
    config = sparse_config(fold_chunks=1, key_code_bits=4)
    lengths, max_new = [56, 23, 41, 3], [24, 20, 9, 12]
    prompts = [prompt_of(n, 1 + i) for i, n in enumerate(lengths)]
    slots = LogitRecorder(model, 2, MAX_LENGTH, prefill_chunk=16, config=config)
    outputs = serve(slots, prompts, max_new, [0, 0, 3, 4])
    assert slots.cache.layers[0].state.code_scale[:, :, 0].gt(0).all(), "every slot holds its prompt's steps"
    for i, (p, m) in enumerate(zip(prompts, max_new)):
        cache = ShadowKVCache(model.config.num_hidden_layers, config, m)
        with torch.no_grad():
            expected = model.generate(torch.tensor([p]), max_new_tokens=m, do_sample=False, cache=cache,
                                      output_logits=True, return_dict_in_generate=True)
        assert outputs[i].generated_tokens == expected.sequences[0, len(p):].tolist(), f"request {i}"
        assert_close(slots.logits[tuple(p)], torch.cat(expected.logits), atol=1e-5, rtol=1e-5, what=f"request {i}")
