"""``bench.fill_random``: a cache filled from random K/V is shaped like a real prefill's and decodes."""
import weakref
from unittest import mock

import pytest
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


def test_replicated_fill_decodes_as_a_real_prefill_of_copies_of_the_prompt():
    """Every row of a replicated fill holds the state a real prefill of that many copies builds: the
    same compressed store, and the same logits step after step (so the same chunks and value hits)."""
    from shadowkv_fx.random_fill import fill_replicated

    _, model = tiny_pair("llama", layers=2)
    config = shadowkv_fx.ShadowKVConfig(sparse_budget=32, rank=8, chunk_size=4, local_chunks=2, outlier_chunks=2,
                                        prefill_rows=2)
    shadowkv_fx.optimize(model, config)
    batch, context = 3, 200
    prompt = torch.randint(3, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(1))
    layers = model.config.num_hidden_layers

    prefilled = shadowkv_fx.ShadowKVCache(layers, config, tail_capacity=8)
    with torch.no_grad():
        real_next = model(prompt.expand(batch, -1), cache=prefilled, logits_to_keep=1).logits[:, -1].argmax(-1, True)
    filled = shadowkv_fx.ShadowKVCache(layers, config, tail_capacity=8)
    scratches = []
    real_init = shadowkv_fx.ShadowKVCache.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        scratches.append(weakref.ref(self))

    with mock.patch.object(shadowkv_fx.ShadowKVCache, "__init__", init):
        token = fill_replicated(model, filled, prompt, batch)
    assert len(scratches) == 1 and scratches[0]() is None, "the scratch cache (its state, its values) outlived the fill"

    assert token.tolist() == real_next.tolist() and filled.get_seq_length() == context
    assert filled.memory_report() == prefilled.memory_report()
    for real, copy in zip(prefilled.layers, filled.layers):
        for name in ("u", "sv", "landmarks", "v_chunks", "k_buf", "outlier_ids"):
            torch.testing.assert_close(getattr(copy.state, name), getattr(real.state, name), msg=name)
    with torch.no_grad():
        for _ in range(3):
            want = model(token, cache=prefilled).logits
            got = model(token, cache=filled).logits
            torch.testing.assert_close(got, want)
            token = want[:, -1].argmax(-1, keepdim=True)


def test_replicated_fill_takes_one_prompt():
    from shadowkv_fx.random_fill import fill_replicated

    _, model = tiny_pair("llama", layers=1)
    shadowkv_fx.optimize(model, shadowkv_fx.ShadowKVConfig(sparse_budget=32, rank=8, chunk_size=4))
    cache = shadowkv_fx.ShadowKVCache(1, shadowkv_fx.ShadowKVConfig(sparse_budget=32, rank=8, chunk_size=4))
    with pytest.raises(ValueError, match=r"one prompt \[1, S\]"):
        fill_replicated(model, cache, torch.zeros(2, 100, dtype=torch.long), 2)


def test_bench_points_above_the_fill_batch_say_how_they_were_filled(monkeypatch):
    """bench's points above --random-fill-above take the fill asked for, below it a real prefill; the table names it."""
    from types import SimpleNamespace

    from shadowkv_fx import bench, bench_report
    from shadowkv_fx.random_fill import FillAbove

    fills = {}

    def run_shadowkv(model, ids, steps, config, fill, alone):
        fills[ids.shape[0]] = fill
        return {"prefill_s": None if fill != "prefill" else 1.0, "step_ms": 1.0, "tok_s": 1.0, "gpu_gib_per_seq": 1.0,
                "state_gib_per_seq": 1.0, "host_gib_per_seq": 0.0, "v_on_gpu": 1.0, "v_hit_rate": 0.7,
                "_cache": None, "cuda_graph": True}

    monkeypatch.setattr(bench, "run_shadowkv", run_shadowkv)
    monkeypatch.setattr(bench, "ensure_optimized", lambda model, config: None)
    monkeypatch.setattr(bench, "_release_memory", lambda: None)
    monkeypatch.setattr(bench, "largest_batch", lambda *a: SimpleNamespace(largest=25, bound="GPU memory"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 0)
    model = SimpleNamespace(config=SimpleNamespace(vocab_size=50), device=torch.device("cpu"))
    rows = bench.bench(model, [64], [1, 4], ["shadowkv"], 2, None, progress=lambda m: None, random_fill_above=2,
                       fill="replicate")
    assert fills == {1: "prefill", 4: "replicate"} and [r.fill for r in rows] == ["prefill", "replicate"]
    assert "prefill 'replicate': one real prefill" in bench_report.table(rows)
    with pytest.raises(ValueError, match="fill must be one of"):
        FillAbove(2, "zeros")
