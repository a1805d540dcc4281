"""Per-layer sparse budgets (``ShadowKVConfig.layer_budgets``, issue #32): each layer selects its own
number of chunks, the preflight counts each layer's, and ``allocate`` splits a total by measured recall."""
import dataclasses

import pytest
import torch

import shadowkv_fx
from shadowkv_fx import preflight
from shadowkv_fx.evaluation import layer_budgets
from shadowkv_fx.prompt_layout import PromptLayout
from tests.models import _dynamo_reset_for_the_module, _fresh_dynamo, left_padded, tiny_pair  # noqa: F401

BASE = shadowkv_fx.ShadowKVConfig(sparse_budget=8, rank=6, chunk_size=4, local_chunks=2, outlier_chunks=2)
NEW = 6


@pytest.fixture(scope="module")
def model():
    _, model = tiny_pair("llama", seed=3, peaked=True)
    shadowkv_fx.optimize(model, BASE)
    return model


def _run(model, config, ids, mask):
    cache = shadowkv_fx.ShadowKVCache(model.config.num_hidden_layers, config, tail_capacity=NEW)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=NEW,
                             min_new_tokens=NEW, do_sample=False, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True)
    return out, cache


def test_each_layer_selects_its_own_chunks_and_equal_budgets_change_nothing(model):
    ids, mask = left_padded(2, [120, 77], 96, seed=3)
    layers = model.config.num_hidden_layers
    plain, _ = _run(model, BASE, ids, mask)
    same, _ = _run(model, dataclasses.replace(BASE, layer_budgets=(8,) * layers), ids, mask)
    assert torch.equal(plain.sequences, same.sequences)
    budgets = tuple(4 * (i + 1) for i in range(layers))  # 1, 2, ... chunks
    mixed, cache = _run(model, dataclasses.replace(BASE, layer_budgets=budgets), ids, mask)
    assert [layer.state.select_k for layer in cache.layers] == [b // 4 for b in budgets]
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(mixed.logits, plain.logits)), \
        "layer 0 selects half the chunks: its logits must move"


def test_preflight_counts_each_layers_budget():
    layout = PromptLayout([0], [1000], [1000 // 8 - 4], 1000)
    cfg = shadowkv_fx.ShadowKVConfig(sparse_budget=64, rank=16, outlier_chunks=4)
    args = (2, 16, torch.float16, layout)
    small, large = (preflight.state_footprint(2, *args, dataclasses.replace(cfg, sparse_budget=b), 32)
                    for b in (32, 96))
    mixed = preflight.state_footprint(2, *args, dataclasses.replace(cfg, layer_budgets=(32, 96)), 32)
    assert mixed.device * 2 == small.device + large.device and mixed.values == small.values == large.values
    assert preflight.state_footprint(2, *args, dataclasses.replace(cfg, layer_budgets=(32, 32)), 32) == small
    assert preflight.state_footprint(2, *args, dataclasses.replace(cfg, layer_budgets=(96, 96)), 32) == large
    with_dense = preflight.state_footprint(2, *args, dataclasses.replace(cfg, layer_budgets=(32, 96), dense_layers=(1,)),
                                           32)
    alone = preflight.state_footprint(2, *args, dataclasses.replace(cfg, sparse_budget=32, dense_layers=(1,)),
                                      32)
    assert with_dense == alone  # a dense layer's budget is never used


def test_bad_layer_budgets_are_refused_naming_the_fix(model):
    for bad in ((), (6, 8), (0, 8), [8, "8"]):
        with pytest.raises(ValueError, match="layer_budgets"):
            dataclasses.replace(BASE, layer_budgets=bad)
    with pytest.raises(ValueError, match="one per layer"):
        shadowkv_fx.ShadowKVCache(model.config.num_hidden_layers, dataclasses.replace(BASE, layer_budgets=(8,) * 7))
    config = dataclasses.replace(BASE, layer_budgets=[8, 16])
    assert config.layer_budgets == (8, 16) and shadowkv_fx.ShadowKVConfig.from_options(config.to_dict()) == config
    assert config.for_layer(1).sparse_budget == 16 and config.for_layer(1).layer_budgets is None


def test_split_total_gives_chunks_where_they_buy_recall():
    curves = {0: {1: 0.99, 2: 0.995, 4: 1.0, 8: 1.0},  # already near-perfect
              1: {1: 0.40, 2: 0.60, 4: 0.80, 8: 0.95},
              2: {1: 0.70, 2: 0.80, 4: 0.85, 8: 0.86}}
    chunks = layer_budgets.split_total(curves, 12)
    assert sum(chunks) <= 12 and chunks[1] == max(chunks) and chunks[0] == min(chunks)
    assert layer_budgets.split_total(curves, 3) == [1, 1, 1]
    with pytest.raises(ValueError, match="smallest measured budgets"):
        layer_budgets.split_total(curves, 2)


@pytest.mark.parametrize("measure", layer_budgets.MEASURES)
def test_allocate_on_a_model_keeps_the_total(model, measure):
    ids = torch.randint(3, 96, (1, 160), generator=torch.Generator().manual_seed(1))
    shadowkv_fx.restore(model)
    try:
        budgets = layer_budgets.allocate(model, ids, BASE, grid=(0.5, 1.0, 2.0), measure=measure)
        with pytest.raises(ValueError, match="measure must be one of"):
            layer_budgets.allocate(model, ids, BASE, grid=(0.5, 1.0), measure="recal")
    finally:
        shadowkv_fx.optimize(model, BASE)
    assert len(budgets) == model.config.num_hidden_layers
    assert all(b % BASE.chunk_size == 0 and b >= BASE.chunk_size for b in budgets)
    assert sum(budgets) <= BASE.sparse_budget * len(budgets)


def test_a_split_carried_to_another_model_keeps_its_shares_and_the_total():
    split = [512, 512, 256, 64, 128, 64]  # measured at a uniform 256 over 6 layers (total 1536)
    assert layer_budgets.rescaled(split, 256, 6, 256, 4) == tuple(split)  # the same model: unchanged
    carried = layer_budgets.rescaled(split, 256, 32, 2048, 8)
    assert sum(carried) == 2048 * 32 and all(b % 8 == 0 and b >= 8 for b in carried)
    depth = [split[i * 6 // 32] for i in range(32)]
    for i in range(32):  # shares by depth: a layer measured to need more never gets less
        assert all(carried[i] >= carried[j] for j in range(32) if depth[i] > depth[j])
    tiny = layer_budgets.rescaled([4000, 4, 4, 4], 256, 4, 16, 4)  # a share under one chunk still gets one
    assert min(tiny) == 4 and sum(tiny) == 64
    with pytest.raises(ValueError, match="whole chunks"):
        layer_budgets.rescaled(split, 256, 32, 2047, 8)
