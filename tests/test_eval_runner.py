"""Sink + local baseline exactness and the runner end to end, on tiny random Llama models.

ShadowKV itself is injected as a fake so these tests do not depend on the core pass.
"""
from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from shadowkv_fx.compat import CACHE_ARG
from shadowkv_fx.config import ShadowKVConfig
from shadowkv_fx.evaluation.baselines import SinkLocalCache, sink_local_generate, sink_local_window_for_budget
from shadowkv_fx.evaluation.results import summarize
from shadowkv_fx.evaluation.runner import ablation_variants, run_eval, shadowkv_attended_tokens


def _tiny_llama(vocab_size: int = 128, attn: str = "sdpa", seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True, attn_implementation=attn,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _greedy(model, input_ids, steps, **kwargs):
    return model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=steps, min_new_tokens=steps,
        do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True, **kwargs,
    )  # fmt: skip


@torch.no_grad()
def _masked_reference(model, input_ids, n_sink, window, steps):
    """Greedy decoding by full recomputation with an explicit 4D mask hiding the evicted middle."""
    sequence, prompt_length, logits = input_ids, input_ids.shape[1], []
    for _ in range(steps):
        length = sequence.shape[1]
        mask = torch.tril(torch.ones(length, length, dtype=torch.bool))
        for query in range(prompt_length, length):  # decode queries: sinks + last `window` keys
            visible = torch.zeros(length, dtype=torch.bool)
            visible[:n_sink] = True
            visible[max(0, query - window + 1) : query + 1] = True
            mask[query] &= visible
        # Additive float mask: eager attention adds the mask to the scores (a bool mask would be added as 0/1).
        additive = torch.zeros(length, length).masked_fill(~mask, torch.finfo(torch.float32).min)
        step_logits = model(sequence, attention_mask=additive[None, None]).logits[0, -1]
        logits.append(step_logits)
        sequence = torch.cat([sequence, step_logits.argmax().view(1, 1)], dim=1)
    return sequence, torch.stack(logits)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_sink_local_equals_dense_when_window_covers_everything(attn):
    model = _tiny_llama(attn=attn)
    input_ids = torch.randint(3, 128, (1, 90), generator=torch.Generator().manual_seed(1))
    dense = _greedy(model, input_ids, 12)
    baseline = sink_local_generate(
        model, input_ids, n_sink=4, window=200, max_new_tokens=12, min_new_tokens=12, pad_token_id=0,
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    assert torch.equal(baseline.sequences, dense.sequences)
    for ours, theirs in zip(baseline.logits, dense.logits):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("window", [8, 33])
def test_sink_local_attends_sinks_and_window_only(attn, window):
    model = _tiny_llama(attn=attn)
    input_ids = torch.randint(3, 128, (1, 90), generator=torch.Generator().manual_seed(2))
    steps, n_sink = 10, 4
    cache = SinkLocalCache(model.config.num_hidden_layers, n_sink=n_sink, window=window)
    out = model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), **{CACHE_ARG: cache}, max_new_tokens=steps,
        min_new_tokens=steps, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    reference, reference_logits = _masked_reference(model, input_ids, n_sink, window, steps)
    assert torch.equal(out.sequences, reference)
    torch.testing.assert_close(torch.cat(out.logits), reference_logits, rtol=1e-4, atol=1e-4)
    # Only the sinks and the window (minus the slot of the next query) stay cached; positions keep counting.
    assert all(layer.keys.shape[-2] == n_sink + window - 1 for layer in cache.layers)
    assert cache.get_seq_length() == input_ids.shape[1] + steps - 1
    assert cache.attended_tokens(input_ids.shape[1]) == n_sink + window - 1
    # And it is a real restriction: the logits move away from dense attention.
    dense = _greedy(model, input_ids, steps)
    assert not torch.allclose(torch.cat(out.logits[1:]), torch.cat(dense.logits[1:]), atol=1e-4)


def test_sink_local_rejects_batches_and_padding():
    model = _tiny_llama()
    with pytest.raises(ValueError):
        sink_local_generate(model, torch.ones(2, 5, dtype=torch.long), 2, 4, max_new_tokens=1)
    with pytest.raises(ValueError):
        sink_local_generate(model, torch.ones(1, 5, dtype=torch.long), 2, 4, 1, attention_mask=torch.tensor([[0, 1, 1, 1, 1]]))


def test_attended_token_accounting():
    config = ShadowKVConfig(sparse_budget=256, chunk_size=8, local_chunks=4, outlier_chunks=48)
    assert shadowkv_attended_tokens(config, 4099) == 256 + 48 * 8 + 4 * 8 + 3
    assert shadowkv_attended_tokens(config, 300) == 300  # shorter than min_sparse_prompt: dense
    assert shadowkv_attended_tokens(config, 650) == 650  # budget + outliers + local cover it all
    assert sink_local_window_for_budget(675, n_sink=4) == 672
    cache = SinkLocalCache(2, n_sink=4, window=672)
    assert cache.attended_tokens(4099) == 675


def test_ablation_variants():
    assert [c.rank for c in ablation_variants("rank").values()] == [32, 64, 160]
    assert [c.chunk_size for c in ablation_variants("chunk").values()] == [4, 8, 16]
    assert [c.outlier_chunks for c in ablation_variants("outliers").values()] == [0, 48]
    bits = ablation_variants("bits")
    assert [(c.value_bits, c.landmark_bits) for c in bits.values()] == [(16, 16), (8, 16), (16, 8), (8, 8)]
    selection = ablation_variants("selection")
    assert [(c.key_code_bits, c.chunk_size, c.local_chunks * c.chunk_size) for c in selection.values()] == [
        (0, 8, 32), (0, 4, 128), (4, 8, 32), (4, 4, 128)]
    assert len({(c.outlier_chunks + c.local_chunks) * c.chunk_size for c in selection.values()}) == 1, "same dense tokens"
    assert list(ablation_variants(None)) == ["shadowkv"]
    with pytest.raises(ValueError):
        ablation_variants("heads")


def test_run_eval_end_to_end_with_fake_shadowkv(tokenizer, tmp_path):
    built, optimized = [], []

    def factory():
        model = _tiny_llama(vocab_size=len(tokenizer))
        built.append(model)
        return model

    def fake_optimize(model, config):
        # Stands in for shadowkv_fx.optimize: same contract (in place, once per model).
        assert not hasattr(model, "fake_shadowkv")
        model.fake_shadowkv = config
        optimized.append(config)
        return model

    variants = {f"rank={r}": ShadowKVConfig(rank=r, local_chunks=2, outlier_chunks=4) for r in (8, 16)}
    records = run_eval(
        factory, tokenizer, tasks=["niah_single_1", "vt"], lengths=["768"], budgets=[64, 100], samples_per_task=2,
        methods=("dense", "shadowkv", "sink_local"), variants=variants, optimize_fn=fake_optimize, n_sink=4, max_new_tokens=3,
        output_json=tmp_path / "out" / "results.json", plot_dir=tmp_path / "out", progress=False, print_table=True,
    )  # fmt: skip
    # 4 samples x (dense + 2 sink_local budgets + 2 variants x 2 budgets)
    assert len(records) == 4 * 7
    assert len(built) == 1 + 4 and [c.sparse_budget for c in optimized] == [64, 96, 64, 96]  # 100 -> whole chunks
    assert [c.rank for c in optimized] == [8, 8, 16, 16]
    by_method = {m: [r for r in records if r["method"] == m] for m in ("dense", "sink_local", "shadowkv")}
    assert all(r["attended_fraction"] == 1.0 and r["budget"] is None for r in by_method["dense"])
    for record in by_method["sink_local"] + by_method["shadowkv"]:
        expected = 96 + 4 * 8 + 2 * 8 if record["budget"] == 100 else 64 + 4 * 8 + 2 * 8
        assert expected <= record["attended_tokens"] < expected + 8
        assert record["attended_fraction"] == pytest.approx(record["attended_tokens"] / record["context_tokens"])
        assert record["attended_fraction"] < 0.5
    # Every method saw the very same samples.
    keys = {m: sorted((r["task"], r["length"], r["index"]) for r in rs if r["budget"] in (None, 64)) for m, rs in by_method.items()}
    assert keys["dense"] == keys["sink_local"] == sorted(keys["shadowkv"][::2])
    for record in records:
        assert 0.0 <= record["score"] <= 1.0 and isinstance(record["prediction"], str)
        assert (record["depth"] is None) == (record["task"] == "vt")
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["records"] == json.loads(json.dumps(records)) and saved["meta"]["budgets"] == [64, 100]
    for name in ("accuracy_by_task.png", "needle_depth_heatmap.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = summarize(records)
    expected_labels = {"dense"} | {f"{m} b={b}" for m in ("sink_local", "rank=8", "rank=16") for b in (64, 100)}
    assert set(summary) == expected_labels


def test_run_eval_accepts_a_model_and_validates_names(tokenizer):
    model = _tiny_llama(vocab_size=len(tokenizer))
    records = run_eval(
        model, tokenizer, tasks=["niah_single_1"], lengths=[256], budgets=[64], samples_per_task=1,
        methods=("dense", "sink_local"), max_new_tokens=2, progress=False, print_table=False,
    )  # fmt: skip
    assert [r["method"] for r in records] == ["dense", "sink_local"]
    with pytest.raises(ValueError):
        run_eval(model, tokenizer, tasks=["nope"], lengths=[256], budgets=[64], progress=False)
    with pytest.raises(ValueError):
        run_eval(model, tokenizer, methods=("h2o",), lengths=[256], budgets=[64], progress=False)


def test_merge_joins_pieces_of_one_run_and_refuses_different_prompts(tmp_path):
    from shadowkv_fx.evaluation.commands import merge_command

    def piece(name, method, context, budget=None):
        meta = {"tasks": ["vt"], "lengths": [2048], "budgets": [] if budget is None else [budget],
                "samples_per_task": 1, "seed": 0, "methods": [method]}
        record = {"method": method, "label": method if budget is None else f"{method} b={budget}", "budget": budget,
                  "task": "vt", "length": 2048, "index": 0, "depth": None, "score": 1.0, "context_tokens": context,
                  "attended_tokens": context, "attended_fraction": 1.0, "prediction": "x", "references": ["x"]}
        path = tmp_path / name / "results.json"
        path.parent.mkdir()
        path.write_text(json.dumps({"meta": meta, "records": [record]}))
        return str(path)

    parts = [piece("a", "dense", 2000), piece("b", "shadowkv", 2000, "1/16")]
    records = merge_command(str(tmp_path / "merged"), parts)
    saved = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert len(records) == 2 and saved["meta"]["methods"] == ["dense", "shadowkv"] and saved["meta"]["budgets"] == ["1/16"]
    assert (tmp_path / "merged" / "accuracy_by_task.png").exists()
    with pytest.raises(ValueError, match="different prompt"):
        merge_command(str(tmp_path / "bad"), parts + [piece("c", "quest", 1999, "1/16")])
