"""Whole decode steps captured as CUDA graphs (GPU only; skipped on the CPU machine)."""
import warnings

import pytest
import torch

import shadowkv_fx
from shadowkv_fx.cuda_graph import DecodeGraph
from tests.models import CUDA_ONLY_REASON, assert_close, left_padded, run_threads_against_serial, tiny_pair
from shadowkv_fx.compat import output_cache

if not torch.cuda.is_available():
    pytest.skip(CUDA_ONLY_REASON, allow_module_level=True)

SMALL = dict(sparse_budget=16, rank=8, chunk_size=4, local_chunks=2, outlier_chunks=2)
# the tolerance of the CPU twins (test_sparse_decode, test_fold): fp32 both sides
ATOL = RTOL = 1e-4


def pair(arch="llama", seed=0, **kw):
    _, a = tiny_pair(arch, seed=seed, peaked=True, **kw)
    _, b = tiny_pair(arch, seed=seed, peaked=True, **kw)
    return a.cuda(), b.cuda()


def assert_same(got, want, what=""):
    assert torch.equal(got.sequences, want.sequences), what
    for step, (g, w) in enumerate(zip(got.logits, want.logits, strict=True)):
        assert_close(g, w, atol=ATOL, rtol=RTOL, what=f"{what} logits at step {step}")


def generate(model, lengths, n, seed=0, **kwargs):
    ids, mask = left_padded(len(lengths), lengths, 96, seed=seed)
    with torch.no_grad():
        return model.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True, **kwargs)


def graphs(cache):
    return [g for g in cache.decode_graphs.values() if isinstance(g, DecodeGraph)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_captured_decode_equals_eager_and_replays(arch):
    eager, graphed = pair(arch)
    config = shadowkv_fx.ShadowKVConfig(**SMALL)
    shadowkv_fx.optimize(eager, config)
    shadowkv_fx.optimize(graphed, config, cuda_graphs=True)
    want = generate(eager, [150, 97], 12)
    got = generate(graphed, [150, 97], 12)
    assert_same(got, want)
    assert len(graphs(output_cache(got))) == 1
    assert output_cache(got).layers[0].state.tail_len == 11


def test_a_new_cache_never_replays_an_old_graph():
    eager, graphed = pair(seed=1)
    config = shadowkv_fx.ShadowKVConfig(**SMALL)
    shadowkv_fx.optimize(eager, config)
    shadowkv_fx.optimize(graphed, config, cuda_graphs=True)
    for lengths, seed in (([150, 97], 1), ([130, 180], 2), ([150, 97], 3)):
        want = generate(eager, lengths, 8, seed=seed)
        got = generate(graphed, lengths, 8, seed=seed)
        assert_same(got, want, f"{lengths}, seed {seed}")


def test_tail_growth_recaptures():
    eager, graphed = pair(seed=2)
    config = shadowkv_fx.ShadowKVConfig(**SMALL)
    shadowkv_fx.optimize(eager, config)
    shadowkv_fx.optimize(graphed, config, cuda_graphs=True)
    ids, mask = left_padded(2, [150, 97], 96, seed=2)
    tokens, logits = {}, {}
    for name, model in (("eager", eager), ("graphed", graphed)):
        cache = model._shadowkv.new_cache(3)
        with torch.no_grad():
            out = model(ids.cuda(), attention_mask=mask.cuda(), cache=cache)
            seq, steps = [out.logits[:, -1:].argmax(-1)], []
            for _ in range(10):
                steps.append(model(seq[-1], cache=cache).logits[:, -1])
                seq.append(steps[-1][:, None].argmax(-1))
        tokens[name], logits[name] = torch.cat(seq, 1), torch.stack(steps, 1)
        if name == "graphed":
            assert cache.layers[0].state.tail_k.shape[2] == 12 and graphs(cache)
    assert torch.equal(tokens["eager"], tokens["graphed"])
    assert_close(logits["graphed"], logits["eager"], atol=ATOL, rtol=RTOL, what="decode logits")


@pytest.mark.parametrize("how", ["mode", "options"])
def test_compile_reduce_overhead_generate_captures_the_decode_step(how):
    eager, compiled_model = pair(seed=4, kv_heads=4, head_dim=64)  # room for the default rank
    if how == "mode":  # torch.compile takes mode or options, not both: the default config
        config, kwargs = shadowkv_fx.ShadowKVConfig(), {"mode": "reduce-overhead"}
        lengths = [700, 420]
    else:
        config, kwargs = shadowkv_fx.ShadowKVConfig(**SMALL), {"options": {**SMALL, "cuda_graphs": True}}
        lengths = [150, 97]
    shadowkv_fx.optimize(eager, config)
    compiled = torch.compile(compiled_model, backend="shadowkv", **kwargs)
    want = generate(eager, lengths, 10, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a capture that fails falls back with a warning
        got = generate(compiled, lengths, 10, seed=4)
    # inductor against eager FX: fp32 reductions fused in another order (H100: up to 1.3e-4 on these
    # peaked logits); a wrong key, position or chunk moves them by 1e-2 and more
    assert torch.equal(got.sequences, want.sequences)
    for step, (g, w) in enumerate(zip(got.logits, want.logits, strict=True)):
        assert_close(g, w, atol=5e-4, rtol=RTOL, what=f"inductor logits at step {step}")
    assert compiled_model._shadowkv.cuda_graphs
    assert len(graphs(output_cache(got))) == 1


def test_collections_during_capture_do_not_break_it():
    """Dead caches (and their graphs) must not be destroyed inside another cache's capture."""
    import gc

    eager, graphed = pair(seed=5)
    config = shadowkv_fx.ShadowKVConfig(**SMALL)
    shadowkv_fx.optimize(eager, config)
    shadowkv_fx.optimize(graphed, config, cuda_graphs=True)
    kept = [generate(graphed, [150, 97], 6, seed=5) for _ in range(3)]  # graphs alive in these caches
    threshold = gc.get_threshold()
    gc.set_threshold(1)
    try:
        del kept
        for seed in (6, 7):
            want = generate(eager, [150, 97], 8, seed=seed)
            got = generate(graphed, [150, 97], 8, seed=seed)
            assert_same(got, want, f"seed {seed}")
            assert graphs(output_cache(got)), "captured, not fallen back"
    finally:
        gc.set_threshold(*threshold)


@pytest.mark.parametrize("arch", ["llama", "glm4", "qwen3"])
def test_triton_decode_path_equals_the_cpu_reference_path(arch):
    """The fused kernels (scoring, rebuild + RoPE, gather, attention) against the plain-PyTorch
    path on the CPU, same model, same sparse config: the GPU path is judged by the CPU oracle."""
    _, cpu_model = tiny_pair(arch, seed=4, peaked=True)
    _, gpu_model = tiny_pair(arch, seed=4, peaked=True)
    config = shadowkv_fx.ShadowKVConfig(**SMALL)
    shadowkv_fx.optimize(cpu_model, config)
    shadowkv_fx.optimize(gpu_model.cuda(), config, cuda_graphs=True)
    ids, mask = left_padded(2, [150, 97], 96, seed=4)
    args = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0, output_logits=True,
                return_dict_in_generate=True)
    with torch.no_grad():
        want = cpu_model.generate(ids, attention_mask=mask, **args)
        got = gpu_model.generate(ids.cuda(), attention_mask=mask.cuda(), **args)
    assert torch.equal(want.sequences, got.sequences.cpu())
    for step, (a, b) in enumerate(zip(want.logits, got.logits, strict=True)):
        assert_close(b.cpu(), a, atol=ATOL, rtol=RTOL, what=f"GPU vs CPU logits at step {step}")
    state = output_cache(got).layers[0].state
    if arch != "glm4":
        assert state.rope_form == "rotate_half", "llama-style RoPE runs inside the rebuild kernel"


def test_threads_with_cuda_graphs_get_their_serial_tokens():
    models = [pair(seed=s)[0] for s in (5, 6)]
    config = shadowkv_fx.ShadowKVConfig(**SMALL)
    for m in models:
        shadowkv_fx.optimize(m, config, cuda_graphs=True)
    cases = [(m, lengths, seed) for m in models for lengths, seed in (([150, 97], 1), ([120], 2))]
    run_threads_against_serial([lambda c=c: generate(c[0], c[1], 9, seed=c[2]).sequences for c in cases], runs=3)
