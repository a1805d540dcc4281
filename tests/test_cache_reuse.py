"""Compress once, ask many (issue #31): transformers' prompt-reuse recipe over a ShadowKV cache.

A document is prefilled into a cache once (``model(doc_ids, past_key_values=cache)``); each question
is answered by ``generate()`` on ``copy.deepcopy(cache)`` with document + question ids, or several
in one batch (``batch_repeat_interleave``). Copies and rows share the document's compressed store
and values (shadowkv_fx/cache_share.py); a cache is saved and loaded as safetensors + JSON
(shadowkv_fx/cache_io.py). One compiled model serves every test here.
"""
import copy
import functools
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings, strategies as st
from safetensors import safe_open

import shadowkv_fx
from shadowkv_fx import cache_io, cache_share, pinned
from shadowkv_fx.cache import ShadowKVCache
from tests.models import (_dynamo_reset_for_the_module, _fresh_dynamo, assert_close, cuda_only,  # noqa: F401
                          full_rank, tiny_pair)

ROOT = Path(__file__).resolve().parents[1]
CHUNK, LOCAL, OUTLIERS = 4, 2, 2
GREEDY = dict(do_sample=False, pad_token_id=0, eos_token_id=None, output_logits=True, return_dict_in_generate=True)
SEED = 31


@functools.cache
def shared():
    """A dense model and its optimized twin at full budget and rank, folding every chunk (so a copy
    reaches a fold point within a few tokens)."""
    dense, model = tiny_pair("llama", seed=SEED, peaked=True)
    return dense, shadowkv_fx.optimize(model, full_config(model))


def full_config(model, **kwargs) -> shadowkv_fx.ShadowKVConfig:
    return shadowkv_fx.ShadowKVConfig(**{"sparse_budget": 4096, "rank": full_rank(model), "chunk_size": CHUNK,
                                         "local_chunks": LOCAL, "outlier_chunks": OUTLIERS, "fold_chunks": 1, **kwargs})


def tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 96, (1, n), generator=torch.Generator().manual_seed(seed))


def prefill(model, doc: torch.Tensor, config=None, tail_capacity: int = 64) -> ShadowKVCache:
    """The recipe's first half: the document into a cache of its own."""
    cache = ShadowKVCache(model.config.num_hidden_layers, config or model._shadowkv.config, tail_capacity)
    with torch.no_grad():
        model(doc, past_key_values=cache)
    return cache


def ask(model, cache, doc, question, new_tokens: int):
    """The recipe's second half: document + question through ``generate`` on a copy of ``cache``."""
    with torch.no_grad():
        return model.generate(torch.cat([doc, question], dim=1), past_key_values=copy.deepcopy(cache),
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, **GREEDY)


def dense_answer(dense, doc, question, new_tokens: int):
    with torch.no_grad():
        return dense.generate(torch.cat([doc, question], dim=1), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              **GREEDY)


def assert_same(actual, expected):
    assert torch.equal(actual.sequences, expected.sequences), (actual.sequences, expected.sequences)
    for step, (a, e) in enumerate(zip(actual.logits, expected.logits, strict=True)):
        assert_close(a, e, atol=2e-4, rtol=1e-4, what=f"logits at step {step}")


def snapshot(cache: ShadowKVCache) -> list[dict]:
    """Every field of every layer's state, copied (tensors cloned, RoPE tables included)."""
    return [{name: [t.clone() for t in value] if name == "rope_tables" else
             value.clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)
             for name, value in vars(layer.state).items()} for layer in cache.layers]


def assert_unchanged(before: list[dict], cache: ShadowKVCache) -> None:
    for i, (old, layer) in enumerate(zip(before, cache.layers)):
        now = vars(layer.state)
        assert old.keys() == now.keys()
        for name, value in old.items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == now[name].dtype and torch.equal(value, now[name]), f"layer {i}: {name} changed"
            elif name == "rope_tables":
                assert len(value) == len(now[name]) and all(map(torch.equal, value, now[name])), f"layer {i}: {name}"
            else:
                assert value == now[name], f"layer {i}: {name} was {value!r}, is {now[name]!r}"


@settings(max_examples=3, deadline=None)
@given(total=st.integers(24, 72), split=st.integers(12, 60), more=st.lists(st.integers(1, 12), max_size=2),
       new_tokens=st.integers(3, 9), seed=st.integers(0, 2**16))
@example(total=60, split=40, more=[1, 12], new_tokens=9, seed=0)  # one-token and long later questions
@example(total=24, split=20, more=[], new_tokens=5, seed=1)  # the shortest document compressed here
@example(total=30, split=12, more=[3], new_tokens=4, seed=2)  # a document too short to compress
def test_every_answer_is_dense_generate_of_document_and_question(total, split, more, new_tokens, seed):
    """At full budget and rank, a text split anywhere into document and question, and more questions
    after it, each asked on a copy of the one prefilled document, get dense ``generate()``'s tokens
    and logits for document + question; asking leaves the document's stored state as it was, bit
    for bit (folds included: every copy of a compressed document here folds)."""
    dense, model = shared()
    text = tokens(total, seed)
    split = min(split, total - 1)
    doc = text[:, :split]
    cache = prefill(model, doc)
    before = snapshot(cache)
    for question in [text[:, split:], *(tokens(n, seed + 1 + i) for i, n in enumerate(more))]:
        assert_same(ask(model, cache, doc, question, new_tokens), dense_answer(dense, doc, question, new_tokens))
    assert_unchanged(before, cache)
    assert cache.get_seq_length() == split


def test_a_copy_shares_the_document_and_owns_what_it_writes():
    """Store, values and padding are the document's own tensors; buffers, counts and (a folding
    cache's) RoPE tables are the copy's; the copy's layers answer for the copy."""
    _, model = shared()
    doc = tokens(50, 0)
    cache = prefill(model, doc)
    twin = copy.deepcopy(cache)
    for layer, other in zip(cache.layers, twin.layers):
        mine, theirs = layer.state, other.state
        for name in cache_share.STORE + cache_share.FIXED:
            if getattr(mine, name) is None:  # the scales of an 8-bit store
                assert getattr(theirs, name) is None, name
                continue
            assert getattr(theirs, name).data_ptr() == getattr(mine, name).data_ptr(), f"{name} is not shared"
        for name in ("k_buf", "v_buf", "key_valid", "pre_k", "tail_fill", "gen_count", "prev_idx", "tail_first"):
            assert getattr(theirs, name).data_ptr() != getattr(mine, name).data_ptr(), f"{name} is shared"
            assert torch.equal(getattr(theirs, name), getattr(mine, name)), name
        assert all(a.data_ptr() != b.data_ptr() for a, b in zip(theirs.rope_tables, mine.rope_tables))
        assert other.owner is twin
    assert twin.rope_tables.sets[0] is twin.layers[0].state.rope_tables, "one set of tables for the copy's layers"
    with torch.no_grad():
        model.generate(torch.cat([doc, tokens(3, 1)], dim=1), past_key_values=twin, max_new_tokens=2, **GREEDY)
    assert (twin.get_seq_length(), cache.get_seq_length()) == (50 + 3 + 1, 50)  # the last token is not cached


def test_a_copy_that_folds_takes_its_own_store_and_changes_no_other():
    """A copy that generates past a fold point copies the store it shared before folding into it:
    the document and a sibling copy made before are bit-identical afterwards, and the sibling
    still answers as dense does; so does the document itself asked directly after its copies."""
    dense, model = shared()
    doc, q1, q2 = tokens(48, 5), tokens(6, 6), tokens(4, 7)
    cache = prefill(model, doc)
    before = snapshot(cache)
    first, second = copy.deepcopy(cache), copy.deepcopy(cache)
    sibling = snapshot(second)
    with torch.no_grad():
        model.generate(torch.cat([doc, q1], dim=1), past_key_values=first, max_new_tokens=10, **GREEDY)
    state = first.layers[0].state
    assert state.chunks[0] > cache.layers[0].state.chunks[0], "the copy folded"
    assert state.u.data_ptr() != cache.layers[0].state.u.data_ptr()
    assert state.v_chunks.data_ptr() != cache.layers[0].state.v_chunks.data_ptr()
    assert_unchanged(before, cache)
    assert_unchanged(sibling, second)
    with torch.no_grad():
        got = model.generate(torch.cat([doc, q2], dim=1), past_key_values=second, max_new_tokens=8,
                             min_new_tokens=8, **GREEDY)
    assert_same(got, dense_answer(dense, doc, q2, 8))
    third = copy.deepcopy(cache)
    kept = snapshot(third)
    with torch.no_grad():
        got = model.generate(torch.cat([doc, q1], dim=1), past_key_values=cache, max_new_tokens=8,
                             min_new_tokens=8, **GREEDY)
    assert_same(got, dense_answer(dense, doc, q1, 8))
    assert_unchanged(kept, third)


def test_copies_add_their_buffers_only_never_the_values():
    """1, 8 and 32 questions on one document (a sparse budget, as served): the values are held
    once, and each copy adds the same device bytes, a fraction of the document's compressed state."""
    _, model = shared()
    config = full_config(model, sparse_budget=16, rank=8)
    cache = prefill(model, tokens(400, 2), config, tail_capacity=16)
    alone = cache_share.distinct_bytes([cache])
    report = cache_share.questions_bytes(cache, (1, 8, 32))
    per_copy = report[1]["device"] - alone["device"]
    assert alone["host"] > 0 and all(r["host"] == alone["host"] for r in report.values()), (alone, report)
    assert report[8]["device"] == alone["device"] + 8 * per_copy, report
    assert report[32]["device"] == alone["device"] + 32 * per_copy, report
    assert 0 < per_copy < (alone["device"] + alone["host"]) / 2, (per_copy, alone)


def test_questions_in_one_batch_read_one_store_and_each_answer_as_dense():
    """Three questions of one length in one batch on a copy of one document: every row reads the
    document's store and values through a zero-stride view (the memory report counts them once),
    and gets dense's tokens and logits for document + its question; the rows fold into a store of
    their own and leave the document as it was."""
    dense, model = shared()
    doc, questions = tokens(50, 8), [tokens(6, 20 + i) for i in range(3)]
    cache = prefill(model, doc)
    before = snapshot(cache)
    batch = copy.deepcopy(cache)
    batch.batch_repeat_interleave(3)
    for layer, rows in zip(cache.layers, batch.layers):
        for name in cache_share.STORE + cache_share.FIXED:
            if (t := getattr(rows.state, name)) is None:  # the scales of an 8-bit store
                continue
            assert t.shape[0] == 3 and t.stride(0) == 0 and t.data_ptr() == getattr(layer.state, name).data_ptr(), name
    assert cache_share.distinct_bytes([cache, batch])["host"] == cache_share.distinct_bytes([cache])["host"]
    assert batch.memory_report()["cpu"]["U"] == cache.memory_report()["cpu"]["U"]
    with torch.no_grad():
        got = model.generate(torch.cat([doc.expand(3, -1), torch.cat(questions)], dim=1), past_key_values=batch,
                             max_new_tokens=8, min_new_tokens=8, **GREEDY)
    for i, question in enumerate(questions):
        want = dense_answer(dense, doc, question, 8)
        assert torch.equal(got.sequences[i : i + 1], want.sequences), (i, got.sequences[i], want.sequences)
        for step, (a, e) in enumerate(zip(got.logits, want.logits, strict=True)):
            assert_close(a[i : i + 1], e, atol=2e-4, rtol=1e-4, what=f"question {i}, logits at step {step}")
    assert batch.layers[0].state.chunks[0] > cache.layers[0].state.chunks[0], "the rows folded"
    assert_unchanged(before, cache)
    with pytest.raises(ValueError, match="one document"):
        batch.batch_repeat_interleave(2)
    with pytest.raises(ValueError, match="repeats must be an int >= 1"):
        copy.deepcopy(cache).batch_repeat_interleave(0)


def test_an_8_bit_store_is_shared_with_its_scales_and_rows_answer_as_copies_asked_alone():
    """Values and landmarks in 8 bits: the rows of one batch read the codes and their scales through
    zero-stride views (the gather and the scoring take them so), and each row answers as a copy of
    the document asked alone."""
    _, model = shared()
    config = full_config(model, sparse_budget=16, value_bits=8, landmark_bits=8)
    doc, questions = tokens(60, 9), [tokens(6, 40 + i) for i in range(3)]
    cache = prefill(model, doc, config)
    assert cache.layers[0].state.v_scale is not None and cache.layers[0].state.landmark_scale is not None
    alone = [ask(model, cache, doc, q, 6) for q in questions]
    batch = copy.deepcopy(cache)
    batch.batch_repeat_interleave(3)
    state = batch.layers[0].state
    assert state.v_scale.stride(0) == 0 and state.landmark_scale.stride(0) == 0
    assert state.v_scale.data_ptr() == cache.layers[0].state.v_scale.data_ptr()
    with torch.no_grad():
        got = model.generate(torch.cat([doc.expand(3, -1), torch.cat(questions)], dim=1), past_key_values=batch,
                             max_new_tokens=6, min_new_tokens=6, **GREEDY)
    for i, want in enumerate(alone):
        assert torch.equal(got.sequences[i : i + 1], want.sequences), (i, got.sequences[i], want.sequences)


def test_the_document_cache_itself_asked_in_one_batch_folds_each_row_apart():
    """No copy: the document's own cache becomes two rows reading one store; their first fold
    gives them a store each (a fold writing through the shared row would mix their answers)."""
    dense, model = shared()
    doc, questions = tokens(47, 12), [tokens(5, 30), tokens(5, 31)]
    cache = prefill(model, doc)
    cache.batch_repeat_interleave(2)
    with torch.no_grad():
        got = model.generate(torch.cat([doc.expand(2, -1), torch.cat(questions)], dim=1), past_key_values=cache,
                             max_new_tokens=7, min_new_tokens=7, **GREEDY)
    assert cache.layers[0].state.u.stride(0) != 0, "the rows folded into stores of their own"
    for i, question in enumerate(questions):
        assert torch.equal(got.sequences[i : i + 1], dense_answer(dense, doc, question, 7).sequences), i


def saved_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_a_saved_cache_loads_field_for_field_as_json_and_safetensors(tmp_path):
    _, model = shared()
    doc = tokens(53, 3)
    cache = prefill(model, doc)
    cache.save_pretrained(tmp_path)
    assert saved_files(tmp_path) == {cache_io.META, cache_io.STATE, cache_io.VALUES}
    meta = json.loads((tmp_path / cache_io.META).read_text())
    assert meta["config"] == cache.config.to_dict()
    assert meta["model"]["config"]["num_hidden_layers"] == 2 and len(meta["model"]["fingerprint"]) == 64
    assert set(meta["versions"]) == {"shadowkv_fx", "transformers", "torch"}
    for name in (cache_io.STATE, cache_io.VALUES):
        assert (tmp_path / name).read_bytes()[:1] != b"\x80", "a pickle"
        with safe_open(str(tmp_path / name), "pt") as f:
            assert list(f.keys())
    loaded = ShadowKVCache.from_pretrained(tmp_path, model=model)
    assert_unchanged(snapshot(cache), loaded)
    assert loaded.layout == cache.layout and loaded.get_seq_length() == 53
    assert loaded.layers[0].state.rope_tables is loaded.rope_tables.sets[0]
    assert loaded.layers[1].state.rope_tables is loaded.layers[0].state.rope_tables


def test_a_cache_saved_after_it_folded_continues_as_dense(tmp_path):
    """A copy that answered (and folded) is saved between turns; loaded, the next turn is what the
    copy itself and dense give."""
    dense, model = shared()
    doc, question = tokens(50, 0), tokens(6, 10)
    asked = copy.deepcopy(prefill(model, doc))
    with torch.no_grad():
        first = model.generate(torch.cat([doc, question], 1), past_key_values=asked, max_new_tokens=6,
                               min_new_tokens=6, **GREEDY)
    assert asked.layers[0].state.chunks[0] > asked.layers[0].state.prompt_chunks[0], "it folded"
    asked.save_pretrained(tmp_path)
    loaded = ShadowKVCache.from_pretrained(tmp_path, model=model)
    turn = torch.cat([first.sequences, tokens(3, 11)], dim=1)
    with torch.no_grad():
        want = dense.generate(turn, max_new_tokens=5, min_new_tokens=5, **GREEDY)
        assert_same(model.generate(turn, past_key_values=loaded, max_new_tokens=5, min_new_tokens=5, **GREEDY), want)
        assert_same(model.generate(turn, past_key_values=asked, max_new_tokens=5, min_new_tokens=5, **GREEDY), want)


FRESH_PROCESS = """
import copy, json, sys, torch
import shadowkv_fx
from shadowkv_fx.cache import ShadowKVCache
from tests.models import tiny_pair
from tests.test_cache_reuse import GREEDY, SEED, full_config, tokens
_, model = tiny_pair("llama", seed=SEED, peaked=True)
shadowkv_fx.optimize(model, full_config(model))
cache = ShadowKVCache.from_pretrained(sys.argv[1])  # no model: the first forward checks it
doc, question = tokens(int(sys.argv[2]), 3), tokens(5, 4)
with torch.no_grad():
    out = model.generate(torch.cat([doc, question], 1), past_key_values=copy.deepcopy(cache), max_new_tokens=6,
                         min_new_tokens=6, **GREEDY)
print(json.dumps(out.sequences.tolist()))
"""


def test_a_fresh_process_answers_from_a_loaded_cache_with_the_same_tokens(tmp_path):
    dense, model = shared()
    doc, question = tokens(53, 3), tokens(5, 4)
    prefill(model, doc).save_pretrained(tmp_path)
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(FRESH_PROCESS), str(tmp_path), "53"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got == dense_answer(dense, doc, question, 6).sequences.tolist()


@pytest.mark.parametrize("other, named", [
    (dict(layers=3), "num_hidden_layers is 2 in the cache's model, 3 in this one"),
    (dict(head_dim=8), "head_dim is 16 in the cache's model, 8 in this one"),
    (dict(seed=SEED + 1), "the weights differ"),
])
def test_loading_for_another_model_is_refused_before_any_work(tmp_path, monkeypatch, other, named):
    _, model = shared()
    prefill(model, tokens(50, 0)).save_pretrained(tmp_path)
    _, wrong = tiny_pair("llama", **{"seed": SEED, "peaked": True, **other})

    def no_reading(*args, **kwargs):
        raise AssertionError("a tensor was read before the model was checked")

    with monkeypatch.context() as patch:
        patch.setattr(cache_io, "load_file", no_reading)
        patch.setattr(cache_io, "_read_values", no_reading)
        with pytest.raises(ValueError, match=named):
            ShadowKVCache.from_pretrained(tmp_path, model=wrong)


def test_a_cache_loaded_without_its_model_refuses_another_at_its_first_forward(tmp_path):
    _, model = shared()
    doc = tokens(50, 0)
    prefill(model, doc).save_pretrained(tmp_path)
    _, wrong = tiny_pair("llama", seed=SEED + 1, peaked=True)
    shadowkv_fx.optimize(wrong, full_config(wrong))
    cache = ShadowKVCache.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="the weights differ"), torch.no_grad():
        wrong(torch.cat([doc, tokens(2, 1)], dim=1)[:, -2:], past_key_values=cache)
    assert cache.get_seq_length() == 50, "nothing was cached"


def test_save_and_load_refuse_what_they_cannot_do(tmp_path):
    _, model = shared()
    with pytest.raises(ValueError, match="needs a prefilled cache"):
        ShadowKVCache(2, full_config(model)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds no saved ShadowKV cache"):
        ShadowKVCache.from_pretrained(tmp_path)
    cache = prefill(model, tokens(50, 0))
    cache.source_model = None  # filled elsewhere: the model must be named
    with pytest.raises(ValueError, match="pass model="):
        cache.save_pretrained(tmp_path)
    cache.save_pretrained(tmp_path, model=model)
    meta = json.loads((tmp_path / cache_io.META).read_text())
    meta["format_version"] = cache_io.FORMAT_VERSION + 1
    (tmp_path / cache_io.META).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="upgrade shadowkv-fx"):
        ShadowKVCache.from_pretrained(tmp_path, model=model)


@cuda_only
def test_loaded_values_land_in_pinned_memory_and_copies_pin_nothing_more(tmp_path):
    _, model = tiny_pair("llama", seed=SEED, peaked=True)
    model = shadowkv_fx.optimize(model.cuda(), full_config(model, value_hbm_gib=0))
    prefill(model, tokens(60, 0).cuda()).save_pretrained(tmp_path)
    cache = ShadowKVCache.from_pretrained(tmp_path, model=model)
    assert all(layer.state.v_chunks.is_pinned() for layer in cache.layers)
    registered = pinned.live_bytes()
    twin = copy.deepcopy(cache)
    assert pinned.live_bytes() == registered
    assert twin.layers[0].state.v_chunks.data_ptr() == cache.layers[0].state.v_chunks.data_ptr()
