"""8-bit values and landmarks end to end on a tiny peaked model (#26): what is stored, what it
costs, and how far the logits and the chunk selection move from the 16-bit store."""
import dataclasses
import functools
import types

import pytest
import torch

import shadowkv_fx
from shadowkv_fx import preflight
from shadowkv_fx.compat import output_cache
from shadowkv_fx.evaluation.landmark_drift import landmark_selection_drift
from shadowkv_fx.kernels import quantize
from shadowkv_fx.prompt_layout import PromptLayout
from tests.models import (_dynamo_reset_for_the_module, _fresh_dynamo, assert_close, left_padded,  # noqa: F401
                          tiny_pair)

# sparse (4 of ~35 chunks per head), folding every 2 chunks: selection, gather and fold all run
SMALL = shadowkv_fx.ShadowKVConfig(sparse_budget=16, rank=8, chunk_size=4, local_chunks=2, outlier_chunks=2,
                                   fold_chunks=2)
LENGTHS, NEW = [150, 97], 24
# Measured on this model and these prompts (seed 3, fp32): 8-bit values move the logits by at most
# 1.8e-2 (7e-4 on most steps; logits up to 0.59), 8-bit landmarks by 7.0e-2; greedy tokens equal.
# Tolerances: a few times that, far below what a dequantisation bug gives (codes read as values
# are ~100x the values).
VALUE_LOGITS_ATOL = 0.06
LANDMARK_LOGITS_ATOL = 0.2
# Measured: 0.5% of (step, layer, row, KV head) selections differ; a random store would differ in
# most (4 picks of ~35 chunks)
DRIFT_BOUND = 0.1


def run(model, ids, mask):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                              output_logits=True, return_dict_in_generate=True, pad_token_id=0)


@functools.cache
def generated(value_bits: int = 16, landmark_bits: int = 16):
    _, model = tiny_pair("llama", seed=3, peaked=True)
    shadowkv_fx.optimize(model, dataclasses.replace(SMALL, value_bits=value_bits, landmark_bits=landmark_bits))
    ids, mask = left_padded(len(LENGTHS), LENGTHS, 96, seed=3)
    return run(model, ids, mask)


@pytest.fixture(scope="module", autouse=True)
def _forget_runs():
    yield
    generated.cache_clear()


def max_logit_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits))


def test_8bit_values_are_int8_with_scales_and_logits_stay_close():
    plain, q8 = generated(), generated(value_bits=8)
    s16, s8 = (output_cache(o).layers[0].state for o in (plain, q8))
    assert s8.v_chunks.dtype == torch.int8 and s8.v_scale.dtype == torch.float32 and s16.v_scale is None
    assert s8.v_scale.device == s8.k_buf.device, "the scales stay on the device: they never cross PCIe"
    assert s8.landmarks.dtype == s16.landmarks.dtype, "value_bits leaves the landmarks alone"
    assert all(c > p for c, p in zip(s8.chunks, s8.prompt_chunks)), "the generated tokens folded into the store"
    for b in range(len(LENGTHS)):
        n, p = s8.chunks[b], s8.prompt_chunks[b]
        back = quantize.dequantize(s8.v_chunks[b, :, :n], s8.v_scale[b, :, :n])
        err = (back - s16.v_chunks[b, :, :n].float()).abs().amax(dim=(-2, -1))  # [Hkv, n]
        scale = s8.v_scale[b, :, :n]
        # the prompt's values are the 16-bit run's exactly (prefill does not read the store): half a step
        assert (err[:, :p] <= scale[:, :p] / 2 * (1 + 1e-5)).all(), f"row {b} prompt chunks"
        # folded chunks come from tokens whose values moved a little with the 8-bit store: one step
        assert (scale[:, p:] > 0).all() and (err[:, p:] <= scale[:, p:]).all(), f"row {b} folded chunks"
        assert (s8.v_scale[b, :, n:] == 0).all(), "nothing is stored past the row's chunks"
    assert torch.equal(plain.sequences, q8.sequences)
    diff = max_logit_diff(plain, q8)
    print(f"value_bits=8: max |logit difference| {diff:.3e} over {NEW} steps")
    assert diff <= VALUE_LOGITS_ATOL
    assert_close(torch.stack(q8.logits), torch.stack(plain.logits), atol=VALUE_LOGITS_ATOL, what="value_bits=8 logits")


def test_8bit_values_take_a_quarter_of_fp32_bytes_in_the_memory_report():
    r16, r8 = (output_cache(o).memory_report()["cpu"] for o in (generated(), generated(value_bits=8)))
    state = output_cache(generated(value_bits=8)).layers[0].state
    assert r8["offloaded_V"] * state.v_buf.element_size() == r16["offloaded_V"], "one byte per value, not four"
    assert r8["value_scales"] == 2 * state.v_scale.numel() * 4 and "value_scales" not in r16  # 2 layers
    others = lambda report: {k: v for k, v in report.items() if k not in ("offloaded_V", "value_scales")}  # noqa: E731
    assert others(r8) == others(r16), "nothing else changes size"


def test_preflight_counts_half_the_host_bytes_so_twice_the_host_bound_batch(monkeypatch):
    """Llama-3.1-8B shape, 122K prompts, bf16, every value on the host: the values of one sequence
    halve (plus 4 bytes of scale per chunk and head on the GPU), so the batch the host holds doubles."""
    model_config = types.SimpleNamespace(num_hidden_layers=32, num_key_value_heads=8, num_attention_heads=32,
                                         head_dim=128, hidden_size=4096, intermediate_size=14336)
    layout = PromptLayout([0], [122880], [122880 // 8 - 4], 122880)
    config = shadowkv_fx.ShadowKVConfig(value_hbm_gib=0)
    f16, f8, both = (preflight.footprint(model_config, layout, c, torch.bfloat16, 64)[0] for c in (
        config, dataclasses.replace(config, value_bits=8),
        dataclasses.replace(config, value_bits=8, landmark_bits=8)))
    assert 2 * f8.values == f16.values
    store = f16.values // (32 * 8 * 8 * 128 * 2)  # chunks per layer and head
    assert f8.device - f16.device == 32 * 8 * store * 4, "one float32 scale per chunk and KV head per layer"
    assert f8.device - both.device == 32 * 8 * store * (128 - 4), "landmarks: 128 bytes less, 4 of scale more"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2000 * 2**30, 2000 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    monkeypatch.setattr(preflight, "_host_available", lambda: 100 * 2**30)
    fits = [preflight.capacity(model_config, layout, c, torch.bfloat16, torch.device("cuda"), 64, expandable=True)
            for c in (config, dataclasses.replace(config, value_bits=8))]
    assert [f.bound for f in fits] == ["host memory (pinned values)"] * 2
    print(f"host-bound batch at 122K: {fits[0].by_host} with 16-bit values, {fits[1].by_host} with 8-bit")
    assert 2 * fits[0].by_host <= fits[1].by_host <= 2 * fits[0].by_host + 1


def test_8bit_landmarks_select_nearly_what_16bit_ones_do():
    """At the states of a 16-bit run, the top-k of its landmarks quantised to int8 differs from its
    own in few selections (``landmark_selection_drift``); a run with landmark_bits=8 stores int8
    landmarks and its logits stay close."""
    _, model = tiny_pair("llama", seed=3, peaked=True)
    shadowkv_fx.optimize(model, SMALL)
    ids, mask = left_padded(len(LENGTHS), LENGTHS, 96, seed=3)
    with landmark_selection_drift() as drift:
        replay = run(model, ids, mask)
    assert torch.equal(replay.sequences, generated().sequences), "measuring changes nothing"
    layers, hkv = model.config.num_hidden_layers, model.config.num_key_value_heads
    assert len(drift.steps) == layers * (NEW - 1) and drift.compared == len(drift.steps) * len(LENGTHS) * hkv
    print(f"landmark_bits=8: {drift.fraction:.2%} of selections and {drift.step_fraction:.2%} of (step, layer) "
          f"pairs pick another chunk set than 16-bit landmarks; {drift.chunk_fraction:.2%} of the chosen chunks swap")
    assert drift.fraction < DRIFT_BOUND and drift.chunk_fraction < DRIFT_BOUND
    q8 = generated(landmark_bits=8)
    state = output_cache(q8).layers[0].state
    assert state.landmarks.dtype == torch.int8 and state.landmark_scale.shape == state.landmarks.shape[:3]
    diff = max_logit_diff(generated(), q8)
    print(f"landmark_bits=8: max |logit difference| {diff:.3e} over {NEW} steps")
    assert diff <= LANDMARK_LOGITS_ATOL


def test_selection_drift_counts_a_store_that_quantises_badly():
    """The drift helper is not blind: with each chunk scored by another chunk's int8 codes, most
    selections differ."""
    from shadowkv_fx.evaluation import landmark_drift

    _, model = tiny_pair("llama", seed=3, peaked=True)
    shadowkv_fx.optimize(model, SMALL)
    ids, mask = left_padded(len(LENGTHS), LENGTHS, 96, seed=3)
    plain = quantize.quantize

    def scrambled(x, dims):
        q, s = plain(x, dims)
        return q.flip(-2), s  # each chunk gets another chunk's codes

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(landmark_drift.quantize, "quantize", scrambled)
        with landmark_selection_drift() as drift:
            run(model, ids, mask)
    assert drift.fraction > DRIFT_BOUND and drift.chunk_fraction > DRIFT_BOUND


def test_8bit_store_serves_slots_as_generate_alone_does():
    """A running slot cache copies an adopted prompt's codes and scales (slot_state.adopt_row):
    each request gets the tokens generate() of it alone gives with the same 8-bit store."""
    _, model = tiny_pair("llama", seed=3, peaked=True)
    shadowkv_fx.optimize(model, dataclasses.replace(SMALL, value_bits=8, landmark_bits=8))
    prompts = [left_padded(1, [n], 96, seed=n)[0][0].tolist() for n in (61, 37, 48)]
    results = model.generate_batch(prompts, max_new_tokens=8, do_sample=False, num_slots=2, prefill_chunk=16)
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            alone = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert results[f"req_{i}"].generated_tokens == alone[0, len(prompt):].tolist(), f"req_{i}"
