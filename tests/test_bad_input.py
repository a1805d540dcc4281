"""Bad input gets a clear error naming the fix, never a silent wrong answer."""
import dataclasses

import pytest
import torch

import shadowkv_fx
from tests.models import left_padded, tiny_pair
from shadowkv_fx.compat import output_cache

CFG = shadowkv_fx.ShadowKVConfig(sparse_budget=16, rank=8, chunk_size=4, local_chunks=2, outlier_chunks=2)


@pytest.fixture(scope="module")
def model():
    _, m = tiny_pair("llama", max_positions=128)
    return shadowkv_fx.optimize(m, CFG)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sparse_budget=2047), "not a multiple of chunk_size=8: use sparse_budget=2040 or 2048"),
        (dict(rank=0), "rank must be a positive int"),
        (dict(chunk_size=3, sparse_budget=10), "multiple of chunk_size"),
        (dict(outlier_chunks=-1), "outlier_chunks must be an int >= 0"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        shadowkv_fx.ShadowKVConfig(**kwargs)


def test_unknown_compile_option_is_named():
    with pytest.raises(ValueError, match=r"unknown ShadowKV option\(s\) \['budget'\]"):
        shadowkv_fx.ShadowKVConfig.from_options({"budget": 8})


def test_rank_above_kv_width():
    _, m = tiny_pair("llama", kv_heads=2, head_dim=8)
    with pytest.raises(ValueError, match=r"rank=17 > H_kv \* D = 2 \* 8: use rank <= 16"):
        shadowkv_fx.optimize(m, shadowkv_fx.ShadowKVConfig(rank=17))


def test_optimize_twice(model):
    with pytest.raises(ValueError, match="already applied"):
        shadowkv_fx.optimize(model, CFG)


def test_prompt_past_context(model):
    ids, mask = left_padded(1, [129], 96)
    with pytest.raises(ValueError, match="past the model's context"), torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=2)


def test_generation_past_context(model):
    ids, mask = left_padded(1, [126], 96)
    with pytest.raises(ValueError, match="past the model's context"), torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, pad_token_id=0)


def test_empty_prompt(model):
    with pytest.raises(ValueError, match="empty prompt"), torch.no_grad():
        model(torch.zeros(1, 0, dtype=torch.long))


def test_fully_padded_row(model):
    ids, mask = left_padded(2, [20, 5], 96)
    mask[1] = 0
    with pytest.raises(ValueError, match=r"empty prompt in batch rows \[1\]"), torch.no_grad():
        model(ids, attention_mask=mask)


def test_padding_between_real_tokens(model):
    ids, mask = left_padded(2, [20, 5], 96)
    mask[0, 10] = 0
    with pytest.raises(ValueError, match="contiguous"), torch.no_grad():
        model(ids, attention_mask=mask)


def test_beam_search(model):
    ids, mask = left_padded(1, [20], 96)
    with pytest.raises(NotImplementedError, match="beam search"), torch.no_grad():
        model.generate(ids, attention_mask=mask, num_beams=2, max_new_tokens=2)


def test_foreign_cache(model):
    import transformers

    ids, mask = left_padded(1, [20], 96)
    with pytest.raises(TypeError, match="needs a ShadowKVCache"), torch.no_grad():
        model(ids, attention_mask=mask, cache=transformers.DynamicCache())


def test_training_mode_model():
    _, m = tiny_pair("llama")
    m.train()
    with pytest.raises(ValueError, match=r"model.eval\(\)"):
        shadowkv_fx.optimize(m, CFG)


def test_cache_is_untouched_after_a_rejected_step(model):
    ids, mask = left_padded(1, [40], 96)
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        cache = output_cache(out)
        length = cache.get_seq_length()
        with pytest.raises(ValueError, match="padding inside generated tokens"):
            model(ids[:, -1:], attention_mask=torch.cat([mask, torch.zeros(1, 1, dtype=torch.long)], 1), cache=cache)
    assert cache.get_seq_length() == length


def test_host_memory_too_small_for_the_batch():
    from shadowkv_fx.preflight import check_host_memory

    with pytest.raises(MemoryError, match="use a smaller batch"):
        check_host_memory(1 << 60)


def test_a_step_that_fails_half_way_leaves_no_layer_ahead(model, monkeypatch):
    from shadowkv_fx import decode_step

    ids, mask = left_padded(1, [40], 96)
    with torch.no_grad():
        cache = output_cache(model(ids, attention_mask=mask))
        model(ids[:, -1:], cache=cache)
        tails = [layer.state.tail_len for layer in cache.layers]
        calls = {"n": 0}
        decode = decode_step.decode

        def failing_second_layer(state, *args):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("simulated device failure")
            return decode(state, *args)

        monkeypatch.setattr(decode_step, "decode", failing_second_layer)
        with pytest.raises(RuntimeError, match="simulated"):
            model(ids[:, -1:], cache=cache)
    assert [layer.state.tail_len for layer in cache.layers] == tails
    assert cache.get_seq_length() == 41


def test_preflight_names_the_largest_batch_that_fits(monkeypatch):
    """A batch whose offloaded values cannot fit in host memory is refused before prefill."""
    from types import SimpleNamespace

    from shadowkv_fx import preflight
    from shadowkv_fx.prompt_layout import PromptLayout

    config = shadowkv_fx.ShadowKVConfig(value_hbm_gib=0)  # folding on: the store also takes 64 generated tokens
    model_config = SimpleNamespace(num_hidden_layers=32, num_key_value_heads=8, num_attention_heads=32, head_dim=128,
                                   hidden_size=4096)
    lengths = [122880] * 16
    chunks = [n // 8 - 4 for n in lengths]
    layout = PromptLayout([0] * 16, lengths, chunks, 122880)
    per_seq = preflight.footprint(model_config, layout, config, torch.bfloat16, 64)[0]
    assert 7.4 * 2**30 < per_seq.values < 7.6 * 2**30, "V of one 122K sequence of the 8B shape is 7.5 GiB"
    assert per_seq.device < 2.5 * 2**30, "the GPU state of one 122K sequence is ~1/7 of its 16 GB dense cache"
    plain = preflight.footprint(model_config, layout, dataclasses.replace(config, fold_chunks=None), torch.bfloat16,
                                64)[0]
    # the fold store's value slots also hold the prompt's local window (32 tokens) and the 64 generated
    assert per_seq.values - plain.values == 32 * (32 + 64) * 8 * 128 * 2
    assert per_seq.device > plain.device, "the fold store's U rows, landmarks and pre-RoPE keys are counted"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (70 * 2**30, 80 * 2**30))
    # blocks torch's allocator keeps but does not use count as free (none here)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2**30)
    monkeypatch.setattr(preflight, "_host_available", lambda: 100 * 2**30)
    # 90 GiB may be pinned, whole pages only (torch's host allocator would round a layer's 2.8 GiB up
    # to 4 GiB, and 8 sequences would be the most): 11 sequences of 7.5 GiB fit, 12 do not
    layer_of_12 = 12 * per_seq.values // 32
    assert layer_of_12 <= preflight.pinned_bytes(layer_of_12) < layer_of_12 + 4096
    with pytest.raises(MemoryError, match="largest batch of these prompts that fits is 11"):
        preflight.check_batch_fits(model_config, layout, config, torch.bfloat16, torch.device("cuda"), 64)
    preflight.check_batch_fits(model_config, PromptLayout([0] * 11, lengths[:11], chunks[:11], 122880), config,
                               torch.bfloat16, torch.device("cuda"), 64)


def test_the_gpu_reserve_is_one_prefill_working_set_where_the_allocator_does_not_fragment(monkeypatch):
    """H100 numbers, Llama-3.1-8B shape, 122K prompts: with expandable segments the reserve is one
    prefill's working set (MLP in chunks), so three layers' values fit beside 16 sequences' state
    and the host holds the other 29: batch 16 fits, 17 does not. Without them a quarter of the
    device stays free, batch 16 is refused, and the refusal names the setting that fits it."""
    from types import SimpleNamespace

    from shadowkv_fx import preflight
    from shadowkv_fx.prompt_layout import PromptLayout

    gib = 2**30
    model_config = SimpleNamespace(num_hidden_layers=32, num_key_value_heads=8, num_attention_heads=32, head_dim=128,
                                   hidden_size=4096, intermediate_size=14336)
    config = shadowkv_fx.ShadowKVConfig()

    def layout(batch):
        return PromptLayout([0] * batch, [122880] * batch, [122880 // 8 - 4] * batch, 122880)

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(63.7 * gib), int(79.19 * gib)))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    monkeypatch.setattr(preflight, "_host_available", lambda: int(123.3 * gib))
    chunked = preflight.work_reserve(model_config, layout(16), config, torch.bfloat16, 80 * gib, expandable=True)
    whole = preflight.work_reserve(model_config, layout(16), dataclasses.replace(config, prefill_mlp_chunk=None),
                                   torch.bfloat16, 80 * gib, expandable=True)
    assert whole - chunked == 3 * (122880 - 8192) * 14336 * 2, "one chunk of MLP intermediates, not the prompt's"
    assert chunked < 0.15 * 80 * gib
    assert preflight.work_reserve(model_config, layout(16), config, torch.bfloat16, 80 * gib,
                                  expandable=False) == 0.25 * 80 * gib
    cuda = torch.device("cuda")
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    per_seq = preflight.footprint(model_config, layout(16), config, torch.bfloat16, 96)[0]
    room = preflight.check_batch_fits(model_config, layout(16), config, torch.bfloat16, cuda, 96)
    assert room >= 3 * 16 * per_seq.values // 32, "three layers of the batch's values go to the GPU"
    with pytest.raises(MemoryError, match="largest batch of these prompts that fits is 16; "):
        preflight.check_batch_fits(model_config, layout(17), config, torch.bfloat16, cuda, 96)
    assert preflight.check_batch_fits(model_config, layout(8), dataclasses.replace(config, value_hbm_gib=0),
                                      torch.bfloat16, cuda, 96) == 0, "value_hbm_gib=0 keeps every value on the host"
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    with pytest.raises(MemoryError, match="fits is 15; .*expandable_segments:True .* it would fit"):
        preflight.check_batch_fits(model_config, layout(16), config, torch.bfloat16, cuda, 96)
