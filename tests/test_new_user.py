"""What a new user trips over gets a clear answer: reports before/after optimize, the real reason a
model is refused, prompts too short to compress, memory named by the device that holds it."""
import logging

import pytest
import torch
import transformers as T

import shadowkv_fx
from shadowkv_fx.compat import output_cache
from tests.models import left_padded, tiny_pair

CFG = shadowkv_fx.ShadowKVConfig(sparse_budget=16, rank=8, chunk_size=4, local_chunks=2, outlier_chunks=2)


def test_pass_report_of_a_model_never_optimized_names_the_fix():
    _, model = tiny_pair("llama")
    with pytest.raises(ValueError, match=r"never optimized.*call shadowkv_fx\.optimize\(model\) first"):
        shadowkv_fx.pass_report(model)


def test_pass_report_after_restore_names_the_fix():
    _, model = tiny_pair("llama")
    shadowkv_fx.optimize(model, CFG)
    assert shadowkv_fx.pass_report(model).rewritten == 2
    shadowkv_fx.restore(model)
    with pytest.raises(ValueError, match=r"was restored.*call shadowkv_fx\.optimize\(model\) first"):
        shadowkv_fx.pass_report(model)


def test_a_model_without_rope_is_refused_for_that_before_its_rank_is_checked():
    # the default rank=160 is far above this GPT-2's H_kv * D = 4 * 8: no rank would make it work
    cfg = T.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, bos_token_id=0, eos_token_id=0)
    gpt2 = T.GPT2LMHeadModel(cfg).eval()
    with pytest.raises(shadowkv_fx.UnsupportedModelError, match="no rotary embedding"):
        shadowkv_fx.optimize(gpt2)
    assert "forward" not in vars(gpt2), "a refused model is left as it was"


def test_a_rank_too_large_is_still_refused_and_leaves_the_model_as_it_was():
    _, model = tiny_pair("llama", kv_heads=2, head_dim=8)
    with pytest.raises(ValueError, match=r"rank=17 > H_kv \* D = 2 \* 8: use rank <= 16"):
        shadowkv_fx.optimize(model, shadowkv_fx.ShadowKVConfig(rank=17))
    assert "forward" not in vars(model) and getattr(model, "_shadowkv", None) is None


def _short_prompt_notes(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "shadowkv_fx.cache" and "not compressed" in r.getMessage()]


def test_a_prompt_too_short_to_compress_is_said_once_and_reported(caplog):
    _, model = tiny_pair("llama")
    caplog.set_level(logging.WARNING, logger="shadowkv_fx")
    shadowkv_fx.optimize(model, CFG)
    assert not _short_prompt_notes(caplog), "optimize's own two-token probe is short on purpose: no note"
    assert CFG.min_sparse_prompt == 20
    ids, mask = left_padded(2, [64, 12], 96, seed=1)  # the second is below 20 tokens
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)
    notes = _short_prompt_notes(caplog)
    assert len(notes) == 1, notes  # once for the generate(), not once per step or layer
    assert "1 of 2 prompts are shorter than 20 tokens" in notes[0] and "outlier_chunks" in notes[0]
    report = output_cache(out).memory_report()
    assert report["uncompressed"] == {"prompts": 1, "min_prompt_tokens": 20}

    caplog.clear()
    ids, mask = left_padded(1, [64], 96, seed=2)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)
    assert not _short_prompt_notes(caplog)
    assert output_cache(out).memory_report()["uncompressed"]["prompts"] == 0


def test_memory_report_names_the_device_that_holds_the_bytes():
    from shadowkv_fx.cache import device_and_host_bytes

    _, model = tiny_pair("llama")
    shadowkv_fx.optimize(model, CFG)
    ids, mask = left_padded(1, [96], 96, seed=3)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)
    report = output_cache(out).memory_report()
    assert "gpu" not in report, "a CPU model's cache is in host RAM: never called 'gpu'"
    assert set(report) == {"cpu", "dense", "uncompressed"}
    assert {"U", "SV", "landmarks", "offloaded_V", "rope_tables"} <= set(report["cpu"])
    device, host = device_and_host_bytes(report)
    assert host == report["cpu"]["offloaded_V"] > 0
    assert device + host == sum(report["cpu"].values())
