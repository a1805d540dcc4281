"""Compression on: the sparse path's bookkeeping, batching invariants and memory report."""
import dataclasses

import torch

import shadowkv_fx
from shadowkv_fx import decode_step
from tests.models import assert_close, full_rank, left_padded, tiny_pair
from shadowkv_fx.cache import device_and_host_bytes
from shadowkv_fx.compat import output_cache

SMALL = shadowkv_fx.ShadowKVConfig(sparse_budget=16, rank=8, chunk_size=4, local_chunks=2, outlier_chunks=2)


def run(model, ids, mask, new_tokens, **kwargs):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                              output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kwargs)


def test_each_sequence_of_a_mixed_batch_gets_what_it_gets_alone():
    """Left padding, one prompt too short to compress and one compressed (DESIGN.md §5)."""
    _, model = tiny_pair("qwen2", seed=5, peaked=True)
    shadowkv_fx.optimize(model, SMALL)
    lengths = [120, 13, 77]
    ids, mask = left_padded(3, lengths, 96, seed=5)
    together = run(model, ids, mask, 6, min_new_tokens=6)
    width = ids.shape[1]
    for b, n in enumerate(lengths):
        alone = run(model, ids[b:b + 1, width - n:], mask[b:b + 1, width - n:], 6, min_new_tokens=6)
        assert torch.equal(together.sequences[b, width:], alone.sequences[0, n:]), b
        for step, (t, a) in enumerate(zip(together.logits, alone.logits)):
            assert_close(t[b], a[0], atol=1e-4, rtol=1e-4, what=f"row {b} step {step}")


def test_selection_is_sparse_and_generated_tokens_are_never_dropped():
    _, model = tiny_pair("llama", seed=1)
    shadowkv_fx.optimize(model, SMALL)
    ids, mask = left_padded(2, [200, 150], 96, seed=1)
    out = run(model, ids, mask, 40)
    cache = output_cache(out)
    state = cache.layers[0].state
    assert state.compressed
    chunks = cache.layout.chunks
    assert chunks == [200 // 4 - 2, 150 // 4 - 2]
    assert state.tail_len == 39, "every generated token but the last is cached"
    for b, n in enumerate([200, 150]):  # each is dense (local window or tail) or folded into the store
        local = int(state.key_valid[b, 0, state.local_start : state.tail_start].sum())
        tail = state.tail_len - state.tail_shift - state.tail_first_host[b]
        assert state.chunks[b] * 4 + local + tail == n + 39
    q = torch.randn(2, model.config.num_attention_heads, 1, model.config.head_dim)
    chunk_idx, picked = decode_step.select(state, q, 0.25)
    assert chunk_idx.shape[-1] == SMALL.budget_chunks and picked.all()
    outliers = ~state.selectable[0, :, : state.chunks[0]]
    assert (outliers.sum(-1) == SMALL.outlier_chunks).all()
    for h in range(outliers.shape[0]):
        assert not torch.isin(chunk_idx[0, h], outliers[h].nonzero().flatten()).any(), "outliers are never re-selected"
    assert cache.get_seq_length() == ids.shape[1] + 39


def test_memory_report_counts_every_component_and_beats_dense_on_long_prompts():
    _, model = tiny_pair("mistral", kv_heads=2, head_dim=16, seed=2)
    shadowkv_fx.optimize(model, shadowkv_fx.ShadowKVConfig(sparse_budget=32, rank=4, chunk_size=8, local_chunks=2, outlier_chunks=2))
    ids, mask = left_padded(1, [1000], 96, seed=2)
    cache = output_cache(run(model, ids, mask, 3))
    report = cache.memory_report()
    layers, hkv, d, elt = 2, 2, 16, 4
    store = -(-(1000 + 3) // 8)  # chunks preallocated: the prompt and the 3 generated tokens may all fold
    assert set(report) == {"cpu", "dense", "uncompressed"}, "a CPU model's cache is all in host RAM, named so"
    assert report["cpu"]["U"] == layers * store * 8 * 4 * elt
    assert report["cpu"]["SV"] == layers * hkv * 4 * d * elt
    assert report["cpu"]["landmarks"] == layers * hkv * store * d * elt
    assert report["cpu"]["outliers"] == layers * 2 * hkv * 2 * 8 * d * elt
    assert report["cpu"]["offloaded_V"] == layers * hkv * store * 8 * d * elt
    assert report["dense"]["kv"] == layers * 2 * (1000 + 2) * hkv * d * elt
    device_bytes, host_bytes = device_and_host_bytes(report)
    assert host_bytes == report["cpu"]["offloaded_V"]
    assert device_bytes < report["dense"]["kv"]


def test_forward_without_generate_makes_and_returns_a_cache():
    _, model = tiny_pair("phi3", seed=4)
    shadowkv_fx.optimize(model, SMALL)
    ids, mask = left_padded(1, [64], 96, seed=4)
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        assert isinstance(output_cache(out), shadowkv_fx.ShadowKVCache)
        step = model(ids[:, -1:], cache=output_cache(out))
    assert step.logits.shape == (1, 1, 96)
    assert output_cache(out).get_seq_length() == 65


def test_value_reuse_changes_no_token_and_serves_repeated_chunks():
    """Chunks the previous step fetched are read from its copy: same tokens and logits, and most
    chunks of consecutive steps are hits (the paper reports ~60%)."""
    _, plain = tiny_pair("llama", seed=7)
    _, reusing = tiny_pair("llama", seed=7)
    shadowkv_fx.optimize(plain, dataclasses.replace(SMALL, reuse_values=False))
    shadowkv_fx.optimize(reusing, SMALL)
    ids, mask = left_padded(2, [200, 150], 96, seed=7)
    want, got = run(plain, ids, mask, 12), run(reusing, ids, mask, 12)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        assert_close(a, b, atol=1e-5, rtol=1e-5, what="logits with value reuse")
    assert output_cache(want).value_hit_rate() is None
    rate = output_cache(got).value_hit_rate()
    assert rate is not None and 0.2 < rate < 1.0, rate


def test_sequences_of_one_layout_share_one_row_of_rope_tables():
    """Equal-length prompts have equal positions, so their RoPE tables are kept once (a row per
    sequence is 59 MiB at 122K on the 8B shape); generated tokens (folded into the store too)
    still give each sequence what it gets alone. Positions a caller makes differ widen them."""
    _, model = tiny_pair("llama", seed=7, peaked=True)
    config = shadowkv_fx.ShadowKVConfig(sparse_budget=16, rank=8, chunk_size=4, local_chunks=2, outlier_chunks=2,
                                        fold_chunks=2)
    shadowkv_fx.optimize(model, config)
    ids, mask = left_padded(3, [90, 90, 90], 96, seed=7)
    together = run(model, ids, mask, 30, min_new_tokens=30)
    cache = output_cache(together)
    tables = [t for shared in cache.rope_tables.sets for t in shared]
    assert tables and all(t.shape[0] == 1 for t in tables)
    assert cache.layers[0].state.folds and cache.layers[0].state.chunks[0] * 4 > 90, "generated tokens were folded"
    for b in range(3):
        alone = run(model, ids[b:b + 1], mask[b:b + 1], 30, min_new_tokens=30)
        assert torch.equal(together.sequences[b], alone.sequences[0]), b
        for step, (t, a) in enumerate(zip(together.logits, alone.logits)):
            assert_close(t[b], a[0], atol=1e-4, rtol=1e-4, what=f"row {b} step {step}")
    mixed = output_cache(run(model, *left_padded(2, [90, 70], 96, seed=7), 3))
    assert all(t.shape[0] == 2 for shared in mixed.rope_tables.sets for t in shared)
    before = [t.clone() for shared in cache.rope_tables.sets for t in shared]
    cache.widen_tables_for(torch.tensor([[120], [120], [120]]))
    assert all(t.shape[0] == 1 for shared in cache.rope_tables.sets for t in shared), "equal positions keep one row"
    cache.widen_tables_for(torch.tensor([[120], [121], [120]]))
    after = [t for shared in cache.rope_tables.sets for t in shared]
    assert all(a.shape[0] == 3 and torch.equal(a, b.expand_as(a)) for a, b in zip(after, before))
    assert all(layer.state.rope_tables[0] is after[0] for layer in cache.layers), "every layer reads the widened table"


def test_prefill_state_and_selection_follow_the_algorithm():
    """Checked against the keys of the dense model, computed here and not by the code under test:
    each landmark is the mean of its chunk's post-RoPE keys, the outliers are each head's chunks
    with the lowest min cosine to their landmark, ``U @ SV`` rebuilds the pre-RoPE keys (full
    rank), and a step picks the ``budget_chunks`` selectable chunks of highest score: softmax of
    ``q . landmarks`` per query head, summed over tokens, max over each GQA group."""
    dense, model = tiny_pair("llama", seed=6, peaked=True)
    config = dataclasses.replace(SMALL, rank=full_rank(model))
    shadowkv_fx.optimize(model, config)
    lengths, chunk = [120, 93], config.chunk_size
    ids, mask = left_padded(2, lengths, 96, seed=6)
    projected = []
    hook = dense.model.layers[0].self_attn.k_proj.register_forward_hook(lambda m, i, out: projected.append(out))
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers left-padded prompts
        keys = output_cache(dense(ids, attention_mask=mask, position_ids=positions)).layers[0].keys  # post-RoPE
        cache = output_cache(model(ids, attention_mask=mask))
    hook.remove()
    state = cache.layers[0].state
    hkv, d = keys.shape[1], keys.shape[3]
    k_pre = projected[0].view(*ids.shape, hkv, d).transpose(1, 2)
    width = ids.shape[1]
    for b, n in enumerate(lengths):
        c = cache.layout.chunks[b]
        assert c == n // chunk - config.local_chunks
        chunks = keys[b, :, width - n : width - n + c * chunk].reshape(hkv, c, chunk, d)
        means = chunks.mean(dim=2)
        assert_close(state.landmarks[b, :, :c], means, atol=1e-5, rtol=1e-5, what=f"row {b} landmarks")
        cosine = (chunks * means[:, :, None]).sum(-1) / (chunks.norm(dim=-1) * means.norm(dim=-1)[:, :, None])
        worst = torch.topk(-cosine.min(dim=-1).values, config.outlier_chunks, dim=-1).indices
        assert torch.equal(state.outlier_ids[b].sort(-1).values, worst.sort(-1).values), b
        selectable = torch.ones(hkv, c, dtype=torch.bool).scatter_(1, worst, False)
        assert torch.equal(state.selectable[b, :, :c], selectable), b
        rebuilt = torch.einsum("tr,hrd->htd", state.u[b, : c * chunk], state.sv[b])
        assert_close(rebuilt, k_pre[b, :, width - n : width - n + c * chunk], atol=1e-5, rtol=1e-4,
                     what=f"row {b} U @ SV")

    heads, group = model.config.num_attention_heads, model.config.num_attention_heads // hkv
    q = torch.randn(2, heads, 1, d, generator=torch.Generator().manual_seed(6)) * 4
    scale = d ** -0.5
    chunk_idx, picked = decode_step.select(state, q, scale)
    for b in range(len(lengths)):
        c = cache.layout.chunks[b]
        logits = torch.einsum("hgd,hcd->hgc", q[b, :, 0].view(hkv, group, d), state.landmarks[b, :, :c]) * scale
        logits = logits.masked_fill(~state.selectable[b, :, None, :c], float("-inf"))
        score = torch.softmax(logits, dim=-1).amax(dim=1)  # [Hkv, c]
        want = torch.topk(score, config.budget_chunks, dim=-1)
        assert float(want.values[:, -1].min()) > 0, "the budget covers selectable chunks only"
        got = chunk_idx[b][picked[b]].view(hkv, -1)
        assert torch.equal(got.sort(-1).values, want.indices.sort(-1).values), f"row {b}: {got} vs {want.indices}"
