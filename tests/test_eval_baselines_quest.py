"""Quest baseline (page bounds, selection, exact decode attention), fractional budgets, the runner and CLI.

ShadowKV itself is injected as a fake in the runner tests so they do not depend on the core pass.
"""
from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, strategies as st

from shadowkv_fx.config import ShadowKVConfig
from shadowkv_fx.evaluation.quest import QuestAttention, page_bounds, quest_generate, quest_page_scores
from shadowkv_fx.evaluation.budgets import parse_budget, resolve_budget
from shadowkv_fx.evaluation.results import summarize
from shadowkv_fx.evaluation.runner import run_eval, shadowkv_attended_tokens
from tests.models import assert_close, tiny_pair


def _greedy(model, input_ids, steps, generate=None, **kwargs):
    kwargs = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0, output_logits=True,
                  return_dict_in_generate=True, **kwargs)  # fmt: skip
    if generate is None:
        return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    return generate(model, input_ids, **kwargs)


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("llama", "eager"), ("qwen3", "sdpa"), ("phi3", "sdpa")])
def test_quest_equals_dense_when_budget_covers_prompt(arch, attn):
    model, _ = tiny_pair(arch, attn=attn, vocab=128)
    input_ids = torch.randint(3, 128, (1, 93), generator=torch.Generator().manual_seed(1))
    dense = _greedy(model, input_ids, 10)
    quest = _greedy(model, input_ids, 10, lambda m, ids, **kw: quest_generate(m, ids, 93, page_size=8, local_pages=2, **kw))
    assert torch.equal(quest.sequences, dense.sequences)
    # sdpa is the dense path itself; eager differs from sdpa by rounding only.
    assert_close(torch.cat(quest.logits), torch.cat(dense.logits), atol=0 if attn == "sdpa" else 1e-5, what="logits")
    assert model.config._attn_implementation == attn


def test_quest_small_budget_changes_decoding_and_restores_attention():
    model, _ = tiny_pair("llama", vocab=128)
    input_ids = torch.randint(3, 128, (1, 93), generator=torch.Generator().manual_seed(2))
    dense = _greedy(model, input_ids, 6)
    quest = _greedy(model, input_ids, 6, lambda m, ids, **kw: quest_generate(m, ids, 40, page_size=8, local_pages=2, **kw))
    # Prefill is dense, so the first token's logits agree; decode steps attend 40 of 93 prompt keys.
    assert_close(quest.logits[0], dense.logits[0], atol=0, what="prefill logits")
    assert not torch.allclose(torch.cat(quest.logits[1:]), torch.cat(dense.logits[1:]), atol=1e-4)
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="not used by the model"):  # raised inside generate
        quest_generate(model, input_ids, 40, 8, 2, max_new_tokens=2, no_such_generate_option=1)
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError):
        quest_generate(model, torch.ones(2, 5, dtype=torch.long), 40, 8, 2, max_new_tokens=1)
    with pytest.raises(ValueError):
        quest_generate(model, torch.ones(1, 5, dtype=torch.long), 40, 8, 2, 1, attention_mask=torch.tensor([[0, 1, 1, 1, 1]]))


def test_page_scores_pick_the_page_aligned_with_the_query():
    # 3 pages of 2 keys, D=4, one KV head. Page 1 points along +e0, page 2 along -e1.
    keys = torch.tensor([[0.1, 0.2, 0.0, 0.3], [0.0, 0.1, 0.2, 0.0],
                         [3.0, 0.0, 0.1, 0.0], [2.0, 0.1, 0.0, 0.0],
                         [0.0, -3.0, 0.0, 0.1], [0.1, -2.0, 0.0, 0.0]]).view(1, 1, 6, 4)  # fmt: skip
    mins, maxs = page_bounds(keys, page_size=2)
    assert torch.equal(mins[0, 0, 1], torch.tensor([2.0, 0.0, 0.0, 0.0]))
    assert torch.equal(maxs[0, 0, 2], torch.tensor([0.1, -2.0, 0.0, 0.1]))
    assert quest_page_scores(torch.tensor([[[1.0, 0.0, 0.0, 0.0]]]), mins, maxs).argmax().item() == 1
    # A negative query component scores through the page minimum.
    assert quest_page_scores(torch.tensor([[[0.0, -1.0, 0.0, 0.0]]]), mins, maxs).argmax().item() == 2
    # GQA: two query heads share the KV head; the group's score is the max of the two.
    both = quest_page_scores(torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.0, -0.5, 0.0, 0.0]]]), mins, maxs)
    assert both[0, 0].tolist() == pytest.approx([0.1, 3.0, 1.5])


@given(
    hkv=st.integers(1, 3), group=st.sampled_from([1, 2, 3]), pages=st.integers(1, 7), page_size=st.sampled_from([1, 3, 8]),
    d=st.sampled_from([5, 16]), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_page_score_bounds_every_key_of_its_page(hkv, group, pages, page_size, d, seed):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, hkv, pages * page_size, d, generator=g) * 3
    query = torch.randn(2, hkv * group, d, generator=g)
    mins, maxs = page_bounds(keys, page_size)
    scores = quest_page_scores(query, mins, maxs)  # [B, Hkv, P]
    # q . k for every query head of a group and every key of a page, max'd over both.
    grouped = query.view(2, hkv, group, d)
    dots = torch.einsum("bhgd,bhtd->bhgt", grouped, keys).view(2, hkv, group, pages, page_size)
    assert bool((scores >= dots.amax(dim=(2, 4)) - 1e-4).all())
    # Per query head, the bound is exactly Quest's sum_d max(q_d * min_d, q_d * max_d).
    q = grouped[:, :, :, None, :]
    definition = torch.maximum(q * mins[:, :, None], q * maxs[:, :, None]).sum(-1).amax(dim=2)
    assert_close(scores, definition, atol=1e-4, rtol=1e-5, what="scores")


@pytest.mark.parametrize("prompt,budget,local_pages", [(61, 29, 1), (64, 40, 2), (37, 5, 0)])
def test_quest_decode_is_exact_attention_over_selected_pages(prompt, budget, local_pages):
    b, hkv, group, d, page, generated = 1, 2, 3, 16, 4, 3
    g = torch.Generator().manual_seed(prompt)
    module = SimpleNamespace(layer_idx=0, num_key_value_groups=group, is_causal=True)
    attention = QuestAttention(budget, page, local_pages)
    keys = torch.randn(b, hkv, prompt + generated, d, generator=g)
    values = torch.randn(b, hkv, prompt + generated, d, generator=g)
    attention(module, torch.randn(b, hkv * group, prompt, d, generator=g), keys[:, :, :prompt], values[:, :, :prompt], None)
    query = torch.randn(b, hkv * group, 1, d, generator=g)
    out, _ = attention(module, query, keys, values, None, scaling=0.3)  # [B, 1, Hq, D]

    local = local_pages * page + prompt % page
    candidates = (prompt - local) // page
    kept = max(0, budget - local) // page
    assert attention.attended_tokens(prompt) == prompt - (candidates - kept) * page
    for h in range(hkv):
        bounds = [
            max((torch.maximum(query[0, h * group + j, 0] * keys[0, h, p * page : (p + 1) * page].amin(0),
                               query[0, h * group + j, 0] * keys[0, h, p * page : (p + 1) * page].amax(0))).sum().item()
                for j in range(group))
            for p in range(candidates)
        ]  # fmt: skip
        chosen = sorted(range(candidates), key=lambda p: -bounds[p])[:kept]
        visible = [t for p in sorted(chosen) for t in range(p * page, (p + 1) * page)]
        visible += list(range(candidates * page, prompt + generated))
        assert len(visible) == attention.attended_tokens(prompt) + generated
        for j in range(group):
            q = query[0, h * group + j, 0]
            weights = torch.softmax(keys[0, h, visible] @ q * 0.3, dim=0)
            assert_close(out[0, 0, h * group + j], weights @ values[0, h, visible], atol=1e-5, what=f"head {h}/{j}")


def test_budget_specs():
    assert parse_budget(256) == 256 and parse_budget("256") == 256 and parse_budget(" 1/16 ") == pytest.approx(1 / 16)
    assert [resolve_budget("1/16", n) for n in (2048, 4096, 8192)] == [128, 256, 512]
    assert resolve_budget("3/64", 1000) == 46 and resolve_budget(300, 8192) == 300
    for bad in ("0", 0, "3/2", "1/0", "abc", "0.1", "-4"):
        with pytest.raises(ValueError):
            parse_budget(bad)


def _tiny_for(tokenizer, attn="sdpa"):
    return tiny_pair("llama", vocab=len(tokenizer), attn=attn, max_positions=4096)[0]


def test_run_eval_quest_and_fractional_budgets(tokenizer, tmp_path):
    optimized = []

    def fake_optimize(model, config):
        optimized.append(config)
        return model

    template = ShadowKVConfig(local_chunks=2, outlier_chunks=4)
    records = run_eval(
        lambda: _tiny_for(tokenizer), tokenizer, tasks=["niah_single_1"], lengths=[512, 768], budgets=[64, "1/8"],
        samples_per_task=1, methods=("dense", "shadowkv", "sink_local", "quest"), variants={"shadowkv": template},
        optimize_fn=fake_optimize, max_new_tokens=2, output_json=tmp_path / "results.json", progress=False,
        print_table=True,
    )  # fmt: skip
    # 2 samples x (dense + 3 methods x 2 specs); "1/8" builds one ShadowKV model per length.
    assert len(records) == 2 * 7
    assert [c.sparse_budget for c in optimized] == [64, 64, 96]
    by_key = {(r["method"], r["budget"], r["length"]): r for r in records}
    for length in (512, 768):
        assert by_key["quest", "1/8", length]["sparse_budget"] == length // 8
        for budget in (64, "1/8"):
            shadowkv = by_key["shadowkv", budget, length]
            for method in ("quest", "sink_local"):
                record = by_key[method, budget, length]
                assert record["attended_tokens"] == shadowkv["attended_tokens"] < record["context_tokens"]
                assert record["sparse_budget"] == shadowkv["sparse_budget"]
            expected = shadowkv_attended_tokens(replace(template, sparse_budget=shadowkv["sparse_budget"]), shadowkv["context_tokens"])
            assert shadowkv["attended_tokens"] == expected
    # Labels (and so the table and plots) group by the spec, across lengths.
    assert set(summarize(records)) == {"dense"} | {f"{m} b={b}" for m in ("shadowkv", "sink_local", "quest") for b in (64, "1/8")}
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["meta"]["budgets"] == [64, "1/8"] and saved["records"] == json.loads(json.dumps(records))
    with pytest.raises(ValueError):
        run_eval(lambda: pytest.fail("built a model"), tokenizer, tasks=["niah_single_1"], lengths=[256], budgets=["2/1"],
                 progress=False)  # fmt: skip


def test_eval_cli_parses_fractional_budgets_device_and_dtype(tokenizer, tmp_path):
    from typer.testing import CliRunner

    from shadowkv_fx.cli import app

    model_dir = tmp_path / "tiny"
    _tiny_for(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "eval", "--model", str(model_dir), "--tasks", "niah_single_1", "--lengths", "512", "--budgets", "1/8,48",
        "--samples", "1", "--methods", "dense,sink_local,quest", "--device", "cpu", "--dtype", "float32",
        "--out-dir", str(out),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    records = json.loads((out / "results.json").read_text())["records"]
    assert sorted((r["method"], str(r["budget"])) for r in records) == [
        ("dense", "None"), ("quest", "1/8"), ("quest", "48"), ("sink_local", "1/8"), ("sink_local", "48")
    ]  # fmt: skip
    assert {r["sparse_budget"] for r in records if r["budget"] == "1/8"} == {64}
