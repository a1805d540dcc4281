"""``bench.fill_random``: a cache filled from random K/V is shaped like a real prefill's and decodes."""
import torch

import shadowkv_fx
from shadowkv_fx.random_fill import fill_random
from tests.models import left_padded, tiny_pair


def test_random_fill_builds_the_state_a_prefill_builds_and_decodes():
    _, model = tiny_pair("llama", layers=2)
    config = shadowkv_fx.ShadowKVConfig(sparse_budget=32, rank=8, chunk_size=4, local_chunks=2, outlier_chunks=2)
    shadowkv_fx.optimize(model, config)
    batch, context = 3, 200
    ids, mask = left_padded(batch, [context] * batch, model.config.vocab_size)
    layers = model.config.num_hidden_layers

    prefilled = shadowkv_fx.ShadowKVCache(layers, config, tail_capacity=8)
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=prefilled, logits_to_keep=1)
    filled = shadowkv_fx.ShadowKVCache(layers, config, tail_capacity=8)
    fill_random(model, filled, batch, context)

    assert filled.get_seq_length() == prefilled.get_seq_length() == context
    assert filled.memory_report() == prefilled.memory_report()
    for real, fake in zip(prefilled.layers, filled.layers):
        assert real.state.rope_form == fake.state.rope_form == "rotate_half"
        for name in ("u", "sv", "landmarks", "selectable", "v_chunks", "k_buf", "key_valid"):
            assert getattr(real.state, name).shape == getattr(fake.state, name).shape, name
        assert fake.state.v_chunks.abs().sum() > 0, "the random values reached the value store"
        # the positions the rebuild reads are the model's own RoPE tables
        for a, b in zip(real.state.rope_tables, fake.state.rope_tables):
            torch.testing.assert_close(a.float(), b.float())
    with torch.no_grad():
        for _ in range(3):
            logits = model(ids[:, -1:], cache=filled).logits
    assert torch.isfinite(logits).all() and filled.get_seq_length() == context + 3
