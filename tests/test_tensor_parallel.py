"""ShadowKV under transformers tensor parallelism (``tp_plan="auto"``), 2 CPU ranks over gloo.

Each rank's pass finds its own attention sites and compresses its own KV heads; no collective is
added (issue #12). Launched from pytest with torch.distributed.run.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T

import shadowkv_fx
from tests.models import QUERY_GAIN, assert_close, sharpen_attention

WORKER = Path(__file__).parent / "tp" / "worker.py"


def _save_tiny(path: Path, kv_heads: int) -> torch.Tensor:
    cfg = T.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=16,
                        max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(cfg).eval()
    sharpen_attention(model, QUERY_GAIN)  # peaked: a rank attending the wrong keys changes tokens
    model.save_pretrained(path)
    ids = torch.randint(3, 96, (2, 57), generator=torch.Generator().manual_seed(1))
    torch.save(ids, path / "prompt.pt")
    return ids, model


def _launch(model_dir: Path, out_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(WORKER), str(model_dir), str(out_dir)],
        env=env, capture_output=True, text=True, timeout=900,
    )


def test_each_rank_serves_its_own_kv_heads(tmp_path):
    ids, single = _save_tiny(tmp_path / "model", kv_heads=2)
    with torch.no_grad():
        out = single.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                              do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    expected, expected_logits = out.sequences.tolist(), out.logits
    run = _launch(tmp_path / "model", tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["dense"] == expected, "transformers' own TP equals one process"
        assert r["full"] == expected, "full budget + full local rank: ShadowKV under TP equals dense"
        for name in ("dense", "full"):
            for step, (got, want) in enumerate(zip(r[f"{name}_logits"], expected_logits, strict=True)):
                assert_close(torch.tensor(got), want, atol=2e-4, rtol=1e-4, what=f"rank {r['rank']} {name} step {step}")
        assert r["local_kv_heads"] == 1, "each rank holds its own KV head, not the whole cache"
        assert r["memory"]["cpu"]["offloaded_V"] > 0, "each rank offloads its own share of V"
    assert ranks[0]["sparse"] == ranks[1]["sparse"], "compressed: every rank produces the same tokens"
    for r in ranks:
        assert r["compiled"] == r["sparse"], "backend='shadowkv' under TP gives the optimize() tokens"
        for step, (got, want) in enumerate(zip(r["compiled_logits"], r["sparse_logits"], strict=True)):
            assert_close(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=1e-4, what=f"compiled step {step}")


def test_kv_heads_not_divisible_by_the_world_size_is_refused():
    _, model = tiny_pair_for_tp()
    model._tp_size = 2
    with pytest.raises(ValueError, match="KV heads .* tensor-parallel"):
        shadowkv_fx.optimize(model, validate=False)


def tiny_pair_for_tp():
    from tests.models import tiny_pair

    return tiny_pair("llama", kv_heads=3, group=1)
