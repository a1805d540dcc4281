"""First token in seconds: one compiled decoder layer for all layers, no recompile for a new
prompt length or batch, and a compile cache that a second process hits."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import shadowkv_fx
from shadowkv_fx import regions
from tests.models import left_padded, tiny_pair

CFG = dict(sparse_budget=16, rank=8, chunk_size=4, local_chunks=2, outlier_chunks=2)
REPO = Path(__file__).resolve().parents[1]


def greedy(model, ids, mask, n=4):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0)


def test_one_region_serves_every_layer_and_new_lengths_compile_nothing():
    whole, model = tiny_pair("llama", layers=4)
    compiled = []

    def counting(gm, example_inputs):
        compiled.append(gm)
        return gm.forward

    shadowkv_fx.optimize(model, shadowkv_fx.ShadowKVConfig(**CFG), compile_graph=counting)
    shadowkv_fx.optimize(whole, shadowkv_fx.ShadowKVConfig(**CFG), regional=False)
    assert all(isinstance(layer.forward, regions.RegionalCall) for layer in regions.decoder_layers(model))
    ids, mask = left_padded(2, [50, 41], 96)
    assert torch.equal(greedy(model, ids, mask), greedy(whole, ids, mask))
    assert len(compiled) == 2  # prefill (symbolic batch and length) and decode, for all 4 layers
    for batch, lengths in ((2, [70, 64]), (3, [45, 45, 29]), (1, [33])):
        ids, mask = left_padded(batch, lengths, 96, seed=batch)
        with torch._dynamo.config.patch(error_on_recompile=batch == 2):
            ours = greedy(model, ids, mask)
        assert torch.equal(ours, greedy(whole, ids, mask)), (batch, lengths)
    assert len(compiled) == 4  # + a static decode graph for batches 3 and 1 (captured as CUDA graphs)
    assert shadowkv_fx.pass_report(model).rewritten == 4


def test_restore_takes_the_regions_out_and_a_copy_gets_its_own():
    import copy

    _, model = tiny_pair("llama")
    shadowkv_fx.optimize(model, shadowkv_fx.ShadowKVConfig(**CFG))
    twin = copy.deepcopy(model)
    for layer, other in zip(regions.decoder_layers(model), regions.decoder_layers(twin)):
        assert other.forward.layer is other and layer.forward.layer is layer
    shadowkv_fx.restore(model)
    assert all("forward" not in layer.__dict__ for layer in regions.decoder_layers(model))
    ids, mask = left_padded(1, [40], 96)
    assert greedy(twin, ids, mask).shape == (1, 44)


SCRIPT = """
import json, sys, time, torch
sys.path.insert(0, {repo!r})
from tests.models import tiny_pair, left_padded
from shadowkv_fx.compile_cache import cache_counters
_, model = tiny_pair("llama", layers=3)
compiled = torch.compile(model, backend="shadowkv", options={options!r})
ids, mask = left_padded(2, [60, 45], 96)
start = time.perf_counter()
with torch.no_grad():
    out = compiled.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                            pad_token_id=0)
print(json.dumps({{"tokens": out.tolist(), "seconds": time.perf_counter() - start, **cache_counters(),
                  "inductor_loaded": "torch._inductor.compile_fx" in sys.modules}}))
"""


def test_a_second_process_hits_the_compile_cache(tmp_path):
    options = dict(CFG, compile_cache=str(tmp_path / "cache"))
    script = SCRIPT.format(repo=str(REPO), options=options)
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    cold, warm = runs
    assert cold["miss"] > 0 and cold["hit"] == 0, cold
    assert warm["hit"] == cold["miss"] and warm["miss"] == 0, (cold, warm)
    assert warm["tokens"] == cold["tokens"]
    assert (tmp_path / "cache" / "inductor").is_dir()
    counters.clear()


def test_the_original_forward_compiled_on_its_own_stays_dense():
    """A dense benchmark compiles the optimized model's original forward (bench.run_dense): the layer
    regions must trace as the plain layers, not as ShadowKV ops with no cache."""
    dense, model = tiny_pair("llama")
    shadowkv_fx.optimize(model, shadowkv_fx.ShadowKVConfig(**CFG))
    compiled = torch.compile(model._shadowkv.original_forward, backend="eager", fullgraph=True)
    ids = left_padded(1, [30], 96)[0]
    with torch.no_grad():
        expected = dense(ids, use_cache=False).logits
        torch.testing.assert_close(compiled(ids, use_cache=False).logits, expected, rtol=0, atol=1e-5)


def test_layers_whose_forward_is_already_wrapped_keep_the_whole_forward_compile():
    """accelerate's offload hooks set ``layer.forward`` on the instance: not replaced."""
    _, model = tiny_pair("llama")
    layers = regions.decoder_layers(model)
    wrapped = layers[0].forward
    layers[0].forward = lambda *args, **kwargs: wrapped(*args, **kwargs)
    shadowkv_fx.optimize(model, shadowkv_fx.ShadowKVConfig(**CFG))
    assert model._shadowkv.regional is None and "forward" not in layers[1].__dict__
    ids, mask = left_padded(1, [40], 96)
    assert greedy(model, ids, mask).shape == (1, 44)


@pytest.mark.parametrize("cpu_inductor", ["1", None])
def test_on_the_cpu_graphs_run_as_fx_and_decode_graphs_compile_only_when_asked(monkeypatch, cpu_inductor):
    """The compile form on the CPU: prompt graphs (symbolic length) run as FX; decode graphs too,
    unless SHADOWKV_CPU_INDUCTOR=1 (what the suite sets) sends them to inductor."""
    import torch._inductor.compile_fx as inductor

    from shadowkv_fx.backend import CPU_INDUCTOR_ENV, cpu_prompt_graph, inductor_graph

    if cpu_inductor is None:
        monkeypatch.delenv(CPU_INDUCTOR_ENV, raising=False)
    else:
        monkeypatch.setenv(CPU_INDUCTOR_ENV, cpu_inductor)
    compiled, seen = [], []
    monkeypatch.setattr(inductor, "compile_fx", lambda gm, inputs, **kw: compiled.append(gm) or gm.forward)

    def recording(gm, example_inputs):
        seen.append(cpu_prompt_graph(gm))
        return inductor_graph(gm, example_inputs)

    dense, model = tiny_pair("llama", layers=2)
    shadowkv_fx.optimize(model, shadowkv_fx.ShadowKVConfig(**CFG), compile_graph=recording)
    ids, mask = left_padded(2, [50, 41], 96)
    assert torch.equal(greedy(model, ids, mask), greedy(dense, ids, mask))
    assert seen == [True, False], "one prompt graph, then one decode graph"
    assert len(compiled) == (1 if cpu_inductor else 0), "only a decode graph, and only when asked, reaches inductor"


def test_a_profiled_first_token_names_where_its_seconds_went(tmp_path):
    from shadowkv_fx.cold_start import _profiled

    def slow_set_up():
        return sum(i * i for i in range(200_000))

    out = tmp_path / "prof" / "compile_warm.txt"
    assert _profiled(slow_set_up, str(out)) == sum(i * i for i in range(200_000))
    text = out.read_text()
    assert "slow_set_up" in text and "cumulative" in text and "internal time" in text
    import pstats

    whole = pstats.Stats(str(out) + ".prof")
    assert any(name == "slow_set_up" for (_, _, name) in whole.stats), "the whole profile is kept for later reading"


def test_the_compile_forms_cpu_tokens_do_not_wait_for_inductor(tmp_path):
    """On the CPU every graph runs as FX unless SHADOWKV_CPU_INDUCTOR=1, so loading inductor (~0.9 s of the
    compile form's first token on the CPU machine) is left to a graph that goes through it."""
    script = SCRIPT.format(repo=str(REPO), options=dict(CFG, compile_cache=str(tmp_path / "cache")))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "SHADOWKV_CPU_INDUCTOR"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["inductor_loaded"] is False
