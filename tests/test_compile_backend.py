"""``torch.compile(model, backend="shadowkv")``: same pass, inductor after it, no recompiles in decode."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch._dynamo.utils import counters

import shadowkv_fx
from shadowkv_fx.backend import ShadowKVInductorKey, inductor_graph
from shadowkv_fx.passes.rewrite import pass_uuid
from tests.models import ARCHS, left_padded, tiny_pair

CFG = dict(sparse_budget=16, rank=8, chunk_size=4, local_chunks=2, outlier_chunks=2)
REPO = Path(__file__).resolve().parents[1]


def greedy(model, ids, mask, n=5):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)


def test_backend_is_found_through_the_entry_point_in_a_fresh_interpreter():
    script = f"""
import json, sys, torch
sys.path.insert(0, {str(REPO)!r})
from tests.models import tiny_pair, left_padded
_, model = tiny_pair("llama")
compiled = torch.compile(model, backend="shadowkv", options={CFG!r})
imported_before_generate = "shadowkv_fx" in sys.modules
ids, mask = left_padded(2, [60, 45], 96)
with torch.no_grad():
    out = compiled.generate(ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
print(json.dumps({{"tokens": out.tolist(), "optimized": model._shadowkv is not None}}))
"""
    probe = subprocess.run([sys.executable, "-c", "import sys, torch; print('shadowkv_fx' in sys.modules)"],
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "False", "importing torch alone must not import shadowkv_fx"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    _, eager = tiny_pair("llama")
    shadowkv_fx.optimize(eager, shadowkv_fx.ShadowKVConfig(**CFG))
    ids, mask = left_padded(2, [60, 45], 96)
    assert result["optimized"]
    assert result["tokens"] == greedy(eager, ids, mask).tolist()


@settings(max_examples=1)
@pytest.mark.parametrize("arch", sorted(ARCHS))
@given(batch=st.integers(1, 2), length=st.integers(21, 70), seed=st.integers(0, 99))
def test_compiled_generate_equals_eager_optimize(arch, batch, length, seed):
    _, eager = tiny_pair(arch, seed=seed)
    _, compiled_model = tiny_pair(arch, seed=seed)
    shadowkv_fx.optimize(eager, shadowkv_fx.ShadowKVConfig(**CFG))
    compiled = torch.compile(compiled_model, backend="shadowkv", options=CFG)
    ids, mask = left_padded(batch, [length, max(1, length - 9)][:batch], 96, seed)
    assert torch.equal(greedy(compiled, ids, mask), greedy(eager, ids, mask))


@pytest.mark.parametrize("regional", [True, False], ids=["one-layer-region", "whole-forward"])
def test_decode_is_one_graph_without_breaks_or_recompiles(regional):
    _, model = tiny_pair("qwen2")
    graphs = []

    def recording_inductor(gm, example_inputs):
        graphs.append(gm)
        return inductor_graph(gm, example_inputs)

    shadowkv_fx.optimize(model, shadowkv_fx.ShadowKVConfig(**CFG), compile_graph=recording_inductor,
                         regional=regional)
    ids, mask = left_padded(2, [50, 41], 96)
    greedy(model, ids, mask, n=3)
    compiled_so_far = len(graphs)
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        greedy(model, ids, mask, n=12)
    assert len(graphs) == compiled_so_far
    assert not counters["graph_break"]
    for gm in graphs:
        calls = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        sites = 1 if regional else model.config.num_hidden_layers  # a region is one decoder layer
        assert calls.count(torch.ops.shadowkv.attention.default) == sites
        assert torch._C._nn.scaled_dot_product_attention not in calls
    if regional:  # one prefill graph (symbolic batch and length: validation's too), one decode graph
        assert len(graphs) == 2


def test_unknown_option_is_named():
    _, model = tiny_pair("llama")
    compiled = torch.compile(model, backend="shadowkv", options={"budget": 64})
    with pytest.raises(ValueError, match=r"unknown ShadowKV option\(s\) \['budget'\]"):
        compiled.generate(torch.ones(1, 4, dtype=torch.long), max_new_tokens=1)


def test_calling_the_compiled_dense_forward_fails_loudly():
    _, model = tiny_pair("llama")
    compiled = torch.compile(model, backend="shadowkv")
    with pytest.raises(Exception, match="would run it dense"), torch.no_grad():
        compiled(torch.ones(1, 4, dtype=torch.long))


def test_graph_without_attention_passes_through_the_backend():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x = torch.randn(4, 8)
    torch.testing.assert_close(torch.compile(mlp, backend="shadowkv")(x), mlp(x))


def test_other_compiled_modules_keep_their_generate():
    dense, _ = tiny_pair("llama")
    compiled = torch.compile(dense, backend="eager")
    assert compiled.generate.__func__ is type(dense).generate


def test_inductor_cache_key_follows_the_pass_source(tmp_path):
    assert ShadowKVInductorKey().uuid() == pass_uuid()
    copy = tmp_path / "passes"
    shutil.copytree(REPO / "passes", copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert pass_uuid(copy) == pass_uuid()
    (copy / "rewrite.py").write_text((copy / "rewrite.py").read_text() + "\n# changed\n")
    assert pass_uuid(copy) != pass_uuid()


def test_cuda_graph_requests_reach_the_runtime_not_inductor():
    from shadowkv_fx.backend import split_options

    config, graph_mode, cuda_graphs = split_options(None, {"sparse_budget": 64, "cuda_graphs": True})
    assert (config.sparse_budget, graph_mode, cuda_graphs) == (64, None, True)
    assert split_options("reduce-overhead", None)[1:] == (None, True)
    assert split_options("max-autotune", None)[1:] == ("max-autotune-no-cudagraphs", True)
    assert split_options("default", None)[1:] == ("default", False)
    with pytest.raises(ValueError, match="unknown ShadowKV option"):
        split_options(None, {"cuda_graph": True})
