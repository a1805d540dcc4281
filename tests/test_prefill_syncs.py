"""Issue #23: no host sync per layer on the prefill path. A layer's prefill queues its RoPE checks on the device
(``rope_detection``) and finds the layers sharing its RoPE tables by their memory, not their values
(``SharedRopeTables``); each forward reads the checks back once, in ``ShadowKVCache.end_step``."""
from unittest import mock

import pytest
import torch

import shadowkv_fx
from shadowkv_fx import rope_detection
from shadowkv_fx.cache import ShadowKVCache
from shadowkv_fx.kernels import dispatch
from shadowkv_fx.layer_state import LayerState
from shadowkv_fx.prompt_layout import PromptLayout
from shadowkv_fx.rope_tables import PieceTables, SharedRopeTables
from tests.models import assert_close, left_padded, tiny_pair
from tests.test_decode_step_static import HOST_SYNC_OPS, OpLog

SMALL = shadowkv_fx.ShadowKVConfig(sparse_budget=16, rank=8, chunk_size=4, local_chunks=2, outlier_chunks=2)
# HOST_SYNC_OPS, and comparisons read back on the host (torch.equal, bool(tensor))
SYNCS = HOST_SYNC_OPS | {"equal", "is_nonzero"}


@pytest.fixture
def model():
    _, m = tiny_pair("llama", seed=3, layers=3)
    return shadowkv_fx.optimize(m, SMALL)


def log_ops(monkeypatch, owner, name: str, seen: list[str]) -> None:
    """Every op of every call of ``owner.name`` goes to ``seen``."""
    plain = getattr(owner, name)

    def logged(*args, **kwargs):
        log = OpLog()
        try:
            with log:
                return plain(*args, **kwargs)
        finally:
            seen.extend(log.names)

    monkeypatch.setattr(owner, name, logged)


def prefill_logging_ops(model, lengths, monkeypatch, prefill_rows=None, prefill_chunk_size=None,
                        logged=("attention",)) -> tuple[ShadowKVCache, list[str]]:
    """Prefill ``lengths`` (left-padded), logging every op of every layer's call of the ``logged`` methods."""
    seen = []
    for name in logged:
        log_ops(monkeypatch, ShadowKVCache, name, seen)
    ids, mask = left_padded(len(lengths), lengths, 96, seed=3)
    cache = model._shadowkv.new_cache(8)
    cache.prefill_rows, cache.prefill_chunk_size = prefill_rows, prefill_chunk_size
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=cache)
    return cache, seen


@pytest.mark.parametrize("prefill_rows", [None, 1], ids=["one_group", "a_group_a_row"])
def test_no_layer_of_a_prefill_reads_the_device_back(model, monkeypatch, prefill_rows):
    cache, seen = prefill_logging_ops(model, [90, 61], monkeypatch, prefill_rows)
    assert seen, "the attention op ran"
    assert not SYNCS & set(seen), sorted(SYNCS & set(seen))
    states = [layer.state for layer in cache.layers]
    assert all(s.rope_pending is None and s.rope_form == "rotate_half" and not s.fused_append for s in states)
    assert len(cache.rope_tables.sets) == 1 and all(s.rope_tables is cache.rope_tables.sets[0] for s in states)
    assert cache.rope_tables._sources == {}, "the tables the forward wrote from are let go at its end"


def test_each_forward_reads_every_layers_checks_at_once(model, monkeypatch):
    """One ``settle`` with checks pending a prefill forward, for all layers, with the fused append where its
    form reproduces the keys (here: a Triton device stood in for)."""
    settled = []
    plain = rope_detection.settle

    def counting(states):
        states = list(states)
        settled.append(sum(s.rope_pending is not None for s in states))
        plain(states)

    monkeypatch.setattr(rope_detection, "settle", counting)
    monkeypatch.setattr(dispatch, "rotates_like_flag",
                        lambda k_pre, k_rot, tables, form, sample=64: torch.tensor(form == "rotate_half"))
    cache, _ = prefill_logging_ops(model, [90, 61], monkeypatch, prefill_rows=1)
    assert [n for n in settled if n] == [3], settled  # the first group compresses every layer; the second had none
    assert all(layer.state.fused_append and layer.state.rope_form == "rotate_half" for layer in cache.layers)


def test_settle_names_no_form_for_tables_that_fit_none():
    """Keys no known form rotates, and tables of no form's shape: the model's own RoPE ("generic"), no fused append."""
    class State(LayerState):
        def __init__(self, tables):
            super().__init__(SMALL)
            self.rope_pending = rope_detection.measure(torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16), tables)

    states = [State([torch.randn(1, 1, 8, 16), torch.randn(1, 1, 8, 16)]), State([torch.randn(1, 1, 8, 16)])]
    assert states[0].rope_pending.errors is not None and states[1].rope_pending.errors is None
    rope_detection.settle(states)
    assert [(s.rope_form, s.fused_append, s.rope_pending) for s in states] == [("generic", False, None)] * 2


def test_tables_are_shared_by_their_memory_and_version_never_by_a_guess():
    """Layers handed views of one cos/sin share a set without a look at the values; a table of the same shape
    elsewhere in memory, or one written since, is compared by value (and kept apart where it differs)."""
    layout = PromptLayout([0], [8], [2], 8)
    cos, sin = torch.randn(1, 1, 8, 16), torch.randn(1, 1, 8, 16)
    tables = SharedRopeTables()
    first, _ = tables.for_layer(0, [cos, sin], [0], layout, layout)
    with mock.patch.object(torch, "equal", side_effect=AssertionError("read back")):
        same, writes = tables.for_layer(1, [cos[:], sin.view(1, 1, 8, 16)], [0], layout, layout)
    assert same is first and not writes
    other, _ = tables.for_layer(2, [cos + 1, sin], [0], layout, layout)
    assert other is not first and torch.equal(other[0], cos + 1)
    equal_copy, _ = tables.for_layer(3, [cos.clone(), sin.clone()], [0], layout, layout)
    assert equal_copy is first, "equal values elsewhere in memory still share (compared by value)"
    cos.add_(1)  # written since layer 0 copied it: the same memory no longer means the same values
    with mock.patch.object(torch, "equal", wraps=torch.equal) as compared:
        tables.for_layer(4, [cos, sin], [0], layout, layout)
    assert compared.called
    tables.forget_sources(prompt_done=True)
    assert tables._sources == {}
    with torch.inference_mode():  # inference tensors count no writes: their memory says nothing of their values
        frozen = [torch.randn(1, 1, 8, 16), torch.randn(1, 1, 8, 16)]
    inference = SharedRopeTables()
    inference.for_layer(0, frozen, [0], layout, layout)
    with mock.patch.object(torch, "equal", wraps=torch.equal) as compared:
        inference.for_layer(1, frozen, [0], layout, layout)
    assert compared.called



@pytest.mark.parametrize("prefill_rows", [None, 1], ids=["one_group", "a_group_a_row"])
def test_a_prompt_in_pieces_stages_one_set_of_tables_for_all_layers(model, monkeypatch, prefill_rows):
    """In pieces (``prefill_chunk_size``) a layer's tables were staged a layer at a time (2 GB of cos/sin at 122K over
    32 layers); now once for the layers handed the same tables, which then share them with no look at their values,
    and the compressed state is the one-piece prefill's."""
    staged = []
    plain = PieceTables.stage

    def spy(self, layer_idx, tables, span, total, rows):
        out = plain(self, layer_idx, tables, span, total, rows)
        staged.append((tuple(rows), span, out[0].untyped_storage().data_ptr()))
        return out

    monkeypatch.setattr(PieceTables, "stage", spy)
    whole, _ = prefill_logging_ops(model, [90, 61], monkeypatch, prefill_rows)
    staged.clear()
    monkeypatch.undo()
    monkeypatch.setattr(PieceTables, "stage", spy)
    # not the whole attention call: SDPA's lower-right causal bias of a later piece is a tensor subclass that a
    # dispatch mode cannot wrap
    seen = []
    log_ops(monkeypatch, PieceTables, "stage", seen)
    cache, compress_ops = prefill_logging_ops(model, [90, 61], monkeypatch, prefill_rows, prefill_chunk_size=32,
                                              logged=("compress_group",))
    assert seen and compress_ops
    assert not SYNCS & set(seen + compress_ops), sorted(SYNCS & set(seen + compress_ops))
    assert len({span for _, span, _ in staged}) > 2, "the prompts went through in pieces"
    for piece in {(rows, span) for rows, span, _ in staged}:
        assert len({ptr for r, s, ptr in staged if (r, s) == piece}) == 1, f"one staged set for all layers: {piece}"
    assert len(cache.rope_tables.sets) == 1 and cache.rope_tables.pieces._sets == []
    assert whole.memory_report() == cache.memory_report()
    for a, b in zip(whole.layers, cache.layers):
        assert a.state.rope_form == b.state.rope_form == "rotate_half"
        assert torch.equal(a.state.rope_tables[0], b.state.rope_tables[0])
        assert_close(b.state.landmarks, a.state.landmarks, atol=1e-5, rtol=1e-5, what="landmarks, in pieces")
