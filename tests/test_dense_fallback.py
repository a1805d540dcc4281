"""Dense fallback (issue #32): layers listed in ``dense_layers``, or whose prompt keys the basis fits
worse than ``dense_fallback_error``, decode densely; their bytes are counted."""
import copy
import dataclasses

import pytest
import torch

import shadowkv_fx
from shadowkv_fx import dense_fallback, preflight
from shadowkv_fx.compat import output_cache
from shadowkv_fx.evaluation.diagnostics import chunk_diagnostics
from shadowkv_fx.prompt_layout import PromptLayout
from shadowkv_fx.slot_cache import SlotCache
from tests.models import (_dynamo_reset_for_the_module, _fresh_dynamo, assert_close, full_rank,  # noqa: F401
                          left_padded, tiny_pair)
from tests.test_decode_step_static import assert_decode_steps_never_sync

# one chunk of budget and rank 2: far from dense on a peaked model
TINY = shadowkv_fx.ShadowKVConfig(sparse_budget=4, rank=2, chunk_size=4, local_chunks=2, outlier_chunks=2,
                                  fold_chunks=2)
LENGTHS = [120, 77]
NEW = 8


@pytest.fixture(scope="module")
def pair():
    dense, model = tiny_pair("llama", seed=3, peaked=True)
    shadowkv_fx.optimize(model, TINY)
    ids, mask = left_padded(2, LENGTHS, 96, seed=3)
    with torch.no_grad():
        expected = dense.generate(ids, attention_mask=mask, **_args())
    return model, ids, mask, expected


def _args() -> dict:
    return dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, output_logits=True,
                return_dict_in_generate=True, pad_token_id=0)


def _run(model, ids, mask, config):
    cache = shadowkv_fx.ShadowKVCache(model.config.num_hidden_layers, config, tail_capacity=NEW)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, past_key_values=cache, **_args())


def _assert_dense(actual, expected):
    assert torch.equal(actual.sequences, expected.sequences)
    for step, (a, e) in enumerate(zip(actual.logits, expected.logits)):
        assert_close(a, e, atol=2e-4, rtol=1e-4, what=f"logits at step {step}")


def test_plain_shadowkv_differs_from_dense_at_this_budget(pair):
    model, ids, mask, expected = pair
    plain = _run(model, ids, mask, TINY)
    differs = not torch.equal(plain.sequences, expected.sequences) or any(
        not torch.allclose(a, e, atol=1e-2) for a, e in zip(plain.logits, expected.logits))
    assert differs, "the budget is not tight enough for the tests below to tell dense from sparse"


def test_every_layer_listed_dense_generates_what_dense_does(pair):
    model, ids, mask, expected = pair
    out = _run(model, ids, mask, dataclasses.replace(TINY, dense_layers=(0, 1)))
    _assert_dense(out, expected)
    cache = output_cache(out)
    for layer in cache.layers:
        assert not layer.state.compressed and layer.state.u is None, "a listed layer keeps no compressed store"
    assert cache.rope_tables.nbytes() == 0, "dense layers read no RoPE tables"


def test_a_bound_of_zero_keeps_every_prompt_dense(pair):
    model, ids, mask, expected = pair
    out = _run(model, ids, mask, dataclasses.replace(TINY, dense_fallback_error=0.0))
    _assert_dense(out, expected)
    cache = output_cache(out)
    for layer in cache.layers:
        assert layer.state.prompt_chunks == [0, 0] and not layer.state.outlier_valid.any()
    assert cache.memory_report()["uncompressed"]["dense_fallback_layers"] == 2


def test_a_bound_no_fit_exceeds_changes_nothing(pair):
    model, ids, mask, _ = pair
    plain = _run(model, ids, mask, TINY)
    loose = _run(model, ids, mask, dataclasses.replace(TINY, dense_fallback_error=1.0))
    assert torch.equal(loose.sequences, plain.sequences)
    for a, e in zip(loose.logits, plain.logits):
        assert torch.equal(a, e)
    assert "dense_fallback_layers" not in output_cache(loose).memory_report()["uncompressed"]


def test_a_bound_between_the_rows_errors_keeps_only_the_worse_row_dense(pair):
    model, ids, mask, _ = pair
    errors = output_cache(_run(model, ids, mask, TINY)).layers[0].state.fit_err.tolist()
    assert errors[0] != errors[1]
    bound = sum(errors) / 2
    state = output_cache(_run(model, ids, mask, dataclasses.replace(TINY, dense_fallback_error=bound))).layers[0].state
    worse = errors.index(max(errors))
    assert state.compressed and state.prompt_chunks[worse] == 0 and state.prompt_chunks[1 - worse] > 0
    n = LENGTHS[worse]
    assert state.tail_start - state.local_start >= n, "the dense row's whole prompt is in the local window"
    assert int(state.key_valid[worse, 0, state.local_start : state.tail_start].sum()) == n
    assert not state.key_valid[worse, :, : state.local_start].any(), "no outlier or selected slot of it is read"


@pytest.mark.parametrize("how", ["listed", "measured"])
def test_a_dense_first_layer_leaves_the_rope_tables_to_a_folding_one(how, monkeypatch):
    """Full budget and rank: the compressed layer equals dense while it folds generated tokens, so
    their RoPE columns must be written although layer 0, which writes them otherwise, is dense: listed
    in ``dense_layers``, or (one prompt, so decided before its state is sized) measured below
    ``dense_fallback_recall`` (the measurement stubbed to fail in layer 0 only)."""
    dense, model = tiny_pair("llama", seed=4, peaked=True)
    cfg = dataclasses.replace(TINY, sparse_budget=4096, rank=full_rank(model))
    if how == "listed":
        cfg = dataclasses.replace(cfg, dense_layers=(0,))
    else:
        cfg = dataclasses.replace(cfg, dense_fallback_recall=0.5)
        monkeypatch.setattr(dense_fallback, "low_recall_rows", lambda config, layer_idx, q, k_rot, group, rows,
                            scale: frozenset(rows) if layer_idx == 0 else frozenset())
    shadowkv_fx.optimize(model, cfg)
    ids, mask = left_padded(1, [61], 96, seed=4)
    args = {**_args(), "max_new_tokens": 24, "min_new_tokens": 24}
    with torch.no_grad():
        expected = dense.generate(ids, attention_mask=mask, **args)
        out = model.generate(ids, attention_mask=mask, **args)
    cache = output_cache(out)
    assert cache.layers[1].state.folds and cache.layers[1].state.chunks[0] > cache.layers[1].state.prompt_chunks[0], \
        "layer 1 must have folded generated tokens for this test to mean anything"
    assert not cache.layers[0].state.compressed and cache.layers[0].state.u is None, "layer 0 keeps no store"
    assert cache.layers[1].state.writes_tables
    _assert_dense(out, expected)


def test_memory_report_counts_a_dense_layer(pair):
    model, ids, mask, _ = pair
    cache = output_cache(_run(model, ids, mask, dataclasses.replace(TINY, dense_layers=(1,))))
    plain = output_cache(_run(model, ids, mask, TINY)).memory_report()["cpu"]
    report = cache.memory_report()
    hkv, d, elt, batch, n = model.config.num_key_value_heads, model.config.head_dim, 4, 2, max(LENGTHS)
    # independently: the whole padded-to-longest prompt, K and V, plus a validity flag per slot
    assert report["cpu"]["dense_fallback"] == batch * hkv * n * (2 * d * elt + 1)
    assert report["cpu"]["local"] == plain["local"] // 2, "the compressed layer's local window is as before"
    assert report["cpu"]["U"] == plain["U"] // 2, "only layer 0 keeps a store"
    assert report["uncompressed"]["dense_fallback_layers"] == 1


def test_preflight_counts_dense_layers_exactly():
    layout = PromptLayout([0], [1000], [1000 // 8 - 4], 1000)
    cfg = shadowkv_fx.ShadowKVConfig(sparse_budget=64, rank=16, outlier_chunks=4)
    hkv, d, tail, kv_token = 2, 16, 32, 2 * 2 * 16 * 2
    one = preflight.state_footprint(1, hkv, d, torch.float16, layout, cfg, tail)
    two = preflight.state_footprint(2, hkv, d, torch.float16, layout, dataclasses.replace(cfg, dense_layers=(1,)), tail)
    assert two.device == one.device + (1000 + tail) * kv_token
    assert two.values == one.values and two.layers == 1
    whole = preflight.state_footprint(2, hkv, d, torch.float16, layout, dataclasses.replace(cfg, dense_layers=(0, 1)),
                                      tail)
    assert (whole.device, whole.values) == (2 * (1000 + tail) * kv_token, 0)


def test_selection_recall_is_the_diagnostics_mass_recall():
    """The prefill measure ``dense_fallback_recall`` reads is the number the diagnostics report
    (both from selection_mass: one pick, one exact mass), averaged over KV heads."""
    g = torch.Generator().manual_seed(0)
    hkv, group, t, d, n = 2, 3, 203, 8, 16
    cfg = shadowkv_fx.ShadowKVConfig(sparse_budget=16, rank=4, chunk_size=4, local_chunks=2, outlier_chunks=3)
    k_rot = torch.randn(hkv, t, d, generator=g)
    k_rot[:, 40:44] += 3 * torch.randn(hkv, 1, d, generator=g)  # a chunk some queries favour
    q = torch.randn(hkv * group, n, d, generator=g) * 2
    rows = chunk_diagnostics(q, k_rot, k_rot, cfg, 0.35)
    expected = sum(r["mass_recall"] for r in rows) / hkv
    assert 0.05 < expected < 0.999, "a selection neither perfect nor empty"
    assert dense_fallback.selection_recall(cfg, q, k_rot, 0.35) == pytest.approx(expected, rel=1e-5)


def test_low_recall_rows_keeps_the_rows_under_the_bound():
    g = torch.Generator().manual_seed(1)
    cfg = shadowkv_fx.ShadowKVConfig(sparse_budget=8, rank=4, chunk_size=4, local_chunks=2, outlier_chunks=2)
    lengths, hq, hkv, d = [90, 70], 4, 2, 8
    k_rot, q = torch.randn(2, hkv, 90, d, generator=g), torch.randn(2, hq, 90, d, generator=g) * 3
    group = PromptLayout([0, 20], lengths, [90 // 4 - 2, 70 // 4 - 2], 90)
    recalls = [dense_fallback.selection_recall(cfg, q[i, :, -16:], k_rot[i, :, group.pad[i]:], 0.3) for i in (0, 1)]
    assert recalls[0] != recalls[1]
    between = dataclasses.replace(cfg, dense_fallback_recall=sum(recalls) / 2)
    rows = [5, 9]  # batch rows of the group's two
    assert dense_fallback.low_recall_rows(between, 0, q, k_rot, group, rows, 0.3) == {rows[recalls.index(min(recalls))]}
    assert dense_fallback.low_recall_rows(dataclasses.replace(between, dense_layers=(0,)), 0, q, k_rot, group, rows,
                                          0.3) == set(), "a listed dense layer is dense anyway"
    assert dense_fallback.low_recall_rows(cfg, 0, q, k_rot, group, rows, 0.3) == set(), "off by default"


@pytest.mark.parametrize("prefill_rows", [1, None])
def test_a_recall_bound_of_one_keeps_every_prompt_dense_and_zero_none(pair, prefill_rows):
    """One row at a time (the default), the second row's slot is sized before it is measured: the
    layer keeps its store; the whole batch at once, the layer is built without one."""
    model, ids, mask, expected = pair
    strict = _run(model, ids, mask, dataclasses.replace(TINY, dense_fallback_recall=1.0, prefill_rows=prefill_rows))
    for layer in output_cache(strict).layers:
        assert layer.state.prompt_chunks == [0, 0], "at one chunk of budget no selection recalls all the mass"
        assert layer.state.compressed == (prefill_rows == 1)
    _assert_dense(strict, expected)
    plain = _run(model, ids, mask, TINY)
    loose = _run(model, ids, mask, dataclasses.replace(TINY, dense_fallback_recall=0.0))
    assert torch.equal(loose.sequences, plain.sequences)
    for a, e in zip(loose.logits, plain.logits):
        assert torch.equal(a, e)


@pytest.mark.parametrize("kwargs, match", [
    (dict(dense_layers=(-1,)), "distinct layer indices >= 0"),
    (dict(dense_layers=(1, 1)), "distinct layer indices >= 0"),
    (dict(dense_layers=("7",)), "distinct layer indices >= 0"),
    (dict(dense_layers=7), "tuple of distinct"),
    (dict(dense_fallback_error=-0.1), r"in \[0, 1\]"),
    (dict(dense_fallback_error=1.5), r"in \[0, 1\]"),
    (dict(dense_fallback_error=True), r"in \[0, 1\]"),
    (dict(dense_fallback_error="0.3"), r"in \[0, 1\]"),
    (dict(dense_fallback_recall=1.01), r"dense_fallback_recall must be None \(off\) or a recall in \[0, 1\]"),
])
def test_bad_knobs_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        shadowkv_fx.ShadowKVConfig(**kwargs)


def test_a_saved_list_reads_back_as_the_same_config():
    cfg = shadowkv_fx.ShadowKVConfig(dense_layers=(8, 7))
    assert cfg.dense_layers == (7, 8)
    assert shadowkv_fx.ShadowKVConfig.from_options({**cfg.to_dict(), "dense_layers": [7, 8]}) == cfg


def test_a_layer_the_model_lacks_is_named():
    with pytest.raises(ValueError, match=r"names layers \[2\] but the model has 2"):
        shadowkv_fx.ShadowKVCache(2, shadowkv_fx.ShadowKVConfig(dense_layers=(1, 2)))


@pytest.mark.parametrize("kwargs", [dict(dense_layers=(0,)), dict(dense_fallback_error=0.2),
                                    dict(dense_fallback_recall=0.8)])
def test_slots_refuse_dense_fallback(kwargs):
    with pytest.raises(ValueError, match="dense_layers=\\(\\), dense_fallback_error=None, dense_fallback_recall=None"):
        SlotCache(2, shadowkv_fx.ShadowKVConfig(**kwargs), num_slots=2, max_length=64)


def test_a_cache_with_a_dense_layer_is_saved_loaded_and_copied(tmp_path):
    """Full budget and rank (layer 1 equals dense, folding): a document prefilled once with layer 0
    dense, saved, loaded and asked on a copy answers as the dense model does."""
    dense, model = tiny_pair("llama", seed=6, peaked=True)
    cfg = dataclasses.replace(TINY, sparse_budget=4096, rank=full_rank(model), dense_layers=(0,))
    shadowkv_fx.optimize(model, cfg)
    g = torch.Generator().manual_seed(6)
    doc, question = (torch.randint(3, 96, (1, n), generator=g) for n in (70, 9))  # the question crosses a fold point
    cache = shadowkv_fx.ShadowKVCache(2, cfg, tail_capacity=NEW)
    with torch.no_grad():
        model(doc, past_key_values=cache)
    cache.save_pretrained(tmp_path)
    loaded = shadowkv_fx.ShadowKVCache.from_pretrained(tmp_path, model=model)
    assert not loaded.layers[0].state.compressed and loaded.layers[1].state.compressed
    prompt = torch.cat([doc, question], dim=1)
    args = {**_args(), "max_new_tokens": 16, "min_new_tokens": 16}
    with torch.no_grad():
        expected = dense.generate(prompt, **args)
        for source in (cache, loaded):
            _assert_dense(model.generate(prompt, past_key_values=copy.deepcopy(source), **args), expected)


@pytest.mark.parametrize("dense_first", [True, False])
def test_speculation_splits_its_steps_where_the_folding_layers_fold(pair, dense_first):
    """Prompt lookup verifies drafts in one step, split where one token at a time would fold: with
    layer 0 dense (it never folds) the split points are the folding layer's, so speculation changes
    no token or logit. ``local_chunks=0`` folds the step's own drafts."""
    model = pair[0]
    cfg = dataclasses.replace(TINY, sparse_budget=16, rank=8, local_chunks=0, fold_chunks=1,
                              dense_layers=(0,) if dense_first else (1,))
    words = torch.randint(3, 96, (1, 25), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([words, words], 1)  # repeats give prompt lookup drafts to verify
    mask = torch.ones_like(ids)
    args = {**_args(), "max_new_tokens": 24, "min_new_tokens": 24}
    with torch.no_grad():
        plain = model.generate(ids, attention_mask=mask, past_key_values=shadowkv_fx.ShadowKVCache(2, cfg, 24),
                               **args)
        spec = model.generate(ids, attention_mask=mask, past_key_values=shadowkv_fx.ShadowKVCache(2, cfg, 24),
                              prompt_lookup_num_tokens=6, **args)
    folding = output_cache(spec).layers[1 if dense_first else 0].state
    assert folding.chunks[0] > folding.prompt_chunks[0], "it folded"
    assert torch.equal(spec.sequences, plain.sequences)
    for step, (a, e) in enumerate(zip(spec.logits, plain.logits)):
        assert_close(a, e, atol=2e-4, rtol=1e-4, what=f"logits at step {step}")


def test_decode_steps_with_dense_layers_never_sync_and_keep_their_buffers(pair, monkeypatch):
    """A decode step stays capturable (tests/test_decode_step_static.py's checks): layer 1 listed
    dense, layer 0 with one row over the bound and the other compressed."""
    model, ids, mask, _ = pair
    errors = output_cache(_run(model, ids, mask, TINY)).layers[0].state.fit_err.tolist()
    cfg = dataclasses.replace(TINY, dense_layers=(1,), dense_fallback_error=sum(errors) / 2)
    cache = shadowkv_fx.ShadowKVCache(2, cfg, tail_capacity=8)
    with torch.no_grad():
        token = model(ids, attention_mask=mask, cache=cache).logits[:, -1:].argmax(-1)
    states = [layer.state for layer in cache.layers]
    assert states[0].compressed and 0 in states[0].prompt_chunks and not states[1].compressed
    addresses = [t.data_ptr() for s in states for t in (s.k_buf, s.v_buf, s.key_valid, s.tail_fill)]
    assert_decode_steps_never_sync(model, token, cache, monkeypatch)
    assert addresses == [t.data_ptr() for s in states for t in (s.k_buf, s.v_buf, s.key_valid, s.tail_fill)]


def test_a_listed_layer_changes_no_other_layer_and_holds_the_exact_keys():
    """Prefill attention is exact whatever is cached, so the layers left compressed hold what plain
    ShadowKV holds, tensor for tensor, and the listed layer holds the dense model's keys and values."""
    dense, model = tiny_pair("llama", layers=3, seed=7, peaked=True)
    shadowkv_fx.optimize(model, TINY)
    ids, mask = left_padded(2, LENGTHS, 96, seed=7)
    caches = []
    for cfg in (TINY, dataclasses.replace(TINY, dense_layers=(1,))):
        caches.append(shadowkv_fx.ShadowKVCache(3, cfg, tail_capacity=NEW))
        with torch.no_grad():
            model(ids, attention_mask=mask, past_key_values=caches[-1])
    plain, mixed = ([layer.state for layer in c.layers] for c in caches)
    for i in (0, 2):
        for name in ("u", "sv", "landmarks", "selectable", "k_buf", "v_buf", "key_valid"):
            assert torch.equal(getattr(mixed[i], name), getattr(plain[i], name)), (i, name)
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # as generate gives a left-padded row
        exact = dense(ids, attention_mask=mask, position_ids=positions, use_cache=True).past_key_values.layers[1]
    state = mixed[1]
    for b, n in enumerate(LENGTHS):
        width = ids.shape[1]
        local = slice(state.local_start, state.local_start + n)
        assert_close(state.k_buf[b, :, local], exact.keys[b, :, width - n :], atol=1e-5, what=f"keys of row {b}")
        assert_close(state.v_buf[b, :, local], exact.values[b, :, width - n :], atol=1e-5, what=f"values of row {b}")


def test_preflight_says_what_the_measured_bounds_leave_uncounted(monkeypatch):
    """A batch that does not fit names the bounds it could not count (their prompts are measured at
    prefill); listed layers are in the count, so they add no note."""
    import transformers

    model_config = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                            num_attention_heads=4, num_key_value_heads=2)
    monkeypatch.setattr(preflight, "device_memory", lambda device: (2**30, 80 * 2**30))
    monkeypatch.setattr(preflight, "expandable_segments", lambda: True)
    layout = PromptLayout([0] * 64, [8000] * 64, [8000 // 8 - 4] * 64, 8000)
    for cfg, note in ((shadowkv_fx.ShadowKVConfig(dense_layers=(1,)), None),
                      (shadowkv_fx.ShadowKVConfig(dense_fallback_recall=0.8), "dense_fallback_recall=0.8 may keep"),
                      (shadowkv_fx.ShadowKVConfig(dense_fallback_error=0.02, dense_fallback_recall=0.8),
                       "dense_fallback_error=0.02 and dense_fallback_recall=0.8 may keep")):
        with pytest.raises(MemoryError) as err:
            preflight.check_batch_fits(model_config, layout, cfg, torch.float16, torch.device("cuda"), 64)
        assert "compressed ShadowKV state needs" in str(err.value)
        assert (note in str(err.value)) if note else "not counted" not in str(err.value)
