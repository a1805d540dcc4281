"""Forward hooks on an optimized model run every step as in plain transformers, with no recompile
per step, or are refused before any work naming the module (issue #33, docs/hooks.md)."""
import pytest
import torch
from torch._dynamo.utils import counters

import shadowkv_fx
from shadowkv_fx.hooks import UnsupportedHookError
from tests.models import assert_close, full_rank, left_padded, tiny_pair

GREEDY = dict(do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
NEW_TOKENS = 3


def full(model, **knobs) -> shadowkv_fx.ShadowKVConfig:
    """Full budget and rank: ShadowKV equals dense, so a hook sees what it sees on the dense twin.
    The whole batch prefills in one forward (``prefill_rows=None``), as on dense."""
    knobs = {"prefill_rows": None, **knobs}
    return shadowkv_fx.ShadowKVConfig(sparse_budget=4096, rank=full_rank(model), chunk_size=4, local_chunks=2,
                                      outlier_chunks=2, **knobs)


def generate(model, new_tokens=NEW_TOKENS, lengths=(24, 24)):
    ids, mask = left_padded(len(lengths), list(lengths), 96, seed=3)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **GREEDY)


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def hidden(args, kwargs):
    """The hidden states a module was called with (transformers passes them either way)."""
    return args[0] if args else kwargs["hidden_states"]


def first_tensor(output):
    return output if isinstance(output, torch.Tensor) else next(o for o in output if isinstance(o, torch.Tensor))


def negated_logits(module, args, kwargs, out):
    """A top-level replacement output: a new output object whose logits are negated."""
    return type(out)(**{**dict(out), "logits": -out.logits})


# kind -> (module path, register(module, log)): each kind of hook a user writes, reading tensors,
# updating Python state, replacing the output or the arguments, with and without kwargs, on
# submodules and on the top-level model (path "").
KINDS = {
    "forward_reads_tensor": ("model.embed_tokens", lambda m, log: m.register_forward_hook(
        lambda mod, args, out: log.append(out.float().norm().item()))),
    "forward_python_state": ("model.layers.1", lambda m, log: m.register_forward_hook(
        lambda mod, args, out: log.append(tuple(first_tensor(out).shape)))),
    "forward_replaces_output": ("model.layers.0.mlp", lambda m, log: m.register_forward_hook(
        lambda mod, args, out: log.append(out.shape[1]) or out * 0.5)),
    "pre_hook_reads": ("model.norm", lambda m, log: m.register_forward_pre_hook(
        lambda mod, args: log.append(tuple(args[0].shape)))),
    "pre_hook_replaces_args": ("model.layers.0.post_attention_layernorm", lambda m, log: m.register_forward_pre_hook(
        lambda mod, args: log.append(args[0].shape[1]) or (args[0] + 1.0,))),
    "forward_with_kwargs": ("model.layers.0", lambda m, log: m.register_forward_hook(
        lambda mod, args, kwargs, out: log.append(tuple(hidden(args, kwargs).shape)), with_kwargs=True)),
    "pre_hook_with_kwargs": ("model.layers.1", lambda m, log: m.register_forward_pre_hook(
        lambda mod, args, kwargs: log.append(tuple(hidden(args, kwargs).shape)), with_kwargs=True)),
    "lm_head_replaces_logits": ("lm_head", lambda m, log: m.register_forward_hook(
        lambda mod, args, out: log.append(out.shape[1]) or out.flip(-1))),
    "forward_always_call": ("model.norm", lambda m, log: m.register_forward_hook(
        lambda mod, args, out: log.append(tuple(out.shape)), always_call=True)),
    "attention_forward_hook": ("model.layers.1.self_attn", lambda m, log: m.register_forward_hook(
        lambda mod, args, out: log.append(out[0].float().norm().item()))),
    "attention_pre_hook_with_kwargs": ("model.layers.0.self_attn", lambda m, log: m.register_forward_pre_hook(
        lambda mod, args, kwargs: log.append(tuple(hidden(args, kwargs).shape)), with_kwargs=True)),
    "inner_model": ("model", lambda m, log: m.register_forward_hook(
        lambda mod, args, out: log.append(tuple(out.last_hidden_state.shape)))),
    "top_level_forward": ("", lambda m, log: m.register_forward_hook(
        lambda mod, args, out: log.append(tuple(out.logits.shape)))),
    "top_level_with_kwargs_replaces": ("", lambda m, log: m.register_forward_hook(
        lambda mod, args, kwargs, out: log.append(kwargs["input_ids"].shape[1]) or negated_logits(mod, args, kwargs, out),
        with_kwargs=True)),
    "top_level_pre_hook": ("", lambda m, log: m.register_forward_pre_hook(
        lambda mod, args, kwargs: log.append(kwargs["input_ids"].shape[1]), with_kwargs=True)),
}
CHANGES_OUTPUT = {"forward_replaces_output", "pre_hook_replaces_args", "lm_head_replaces_logits",
                  "top_level_with_kwargs_replaces"}


def same_logs(actual, expected, kind):
    assert len(actual) == len(expected), f"{kind}: the hook ran {len(actual)} times, {len(expected)} on dense"
    if actual and isinstance(actual[0], float):
        assert_close(torch.tensor(actual), torch.tensor(expected), atol=1e-4, rtol=1e-4, what=f"{kind} values")
    else:
        assert actual == expected, f"{kind}: the hook saw {actual}, on dense {expected}"


@pytest.fixture(scope="module")
def trio():
    """A dense model, an optimized twin, and the optimized model's tokens and logits with no hook."""
    dense, model = tiny_pair("llama", seed=7)
    shadowkv_fx.optimize(model, full(model))
    return dense, model, generate(model)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_hook_runs_every_step_as_on_dense_without_recompiles(trio, kind):
    dense, model, plain = trio
    path, register = KINDS[kind]
    dense_log, log = [], []
    handles = [register(dense.get_submodule(path), dense_log), register(model.get_submodule(path), log)]
    try:
        expected = generate(dense)
        actual = generate(model)
        same_logs(log, dense_log, kind)
        assert len(log) == NEW_TOKENS, f"{kind}: the hook ran {len(log)} times in {NEW_TOKENS} forwards"
        assert torch.equal(actual.sequences, expected.sequences), f"{kind}: tokens differ from dense with the hook"
        for a, e in zip(actual.logits, expected.logits):
            assert_close(a, e, atol=2e-4, rtol=1e-4, what=f"{kind}: logits vs dense with the same hook")
        if kind not in CHANGES_OUTPUT:
            assert torch.equal(actual.sequences, plain.sequences)
            for a, e in zip(actual.logits, plain.logits):
                assert_close(a, e, atol=1e-5, rtol=1e-5, what=f"{kind}: logits vs ShadowKV without hooks")
        else:
            assert any(not torch.allclose(a, e, atol=1e-3) for a, e in zip(actual.logits, plain.logits)), \
                f"{kind}: the replacement did not take effect"
        log.clear()
        before = graphs()
        generate(model, new_tokens=2 * NEW_TOKENS)
        assert graphs() == before, f"{kind}: {graphs() - before} compiles for more decode steps"
        assert len(log) == 2 * NEW_TOKENS, f"{kind}: {len(log)} hook calls for {2 * NEW_TOKENS} forwards"
    finally:
        for handle in handles:
            handle.remove()


def test_submodule_hooks_see_the_prefill_row_by_row_unpadded_with_prefill_rows_1():
    """ShadowKV's own prefill layout, not a hook matter: with ``prefill_rows=1`` (the default) each
    prompt goes through the model alone, without its padding; a top-level hook sees what it sees
    on dense, one call per forward."""
    dense, model = tiny_pair("llama", seed=7)
    shadowkv_fx.optimize(model, full(model, prefill_rows=1))
    inner, outer, dense_outer = [], [], []
    model.model.embed_tokens.register_forward_hook(lambda m, a, o: inner.append(tuple(o.shape[:2])))
    model.register_forward_hook(lambda m, a, o: outer.append(tuple(o.logits.shape)))
    dense.register_forward_hook(lambda m, a, o: dense_outer.append(tuple(o.logits.shape)))
    generate(model, lengths=(24, 17))
    generate(dense, lengths=(24, 17))
    assert inner == [(1, 24), (1, 17)] + [(2, 1)] * (NEW_TOKENS - 1)
    assert outer == dense_outer and len(outer) == NEW_TOKENS


def test_hook_added_after_optimize_is_noticed_and_removal_restores_the_fullgraph_path(trio):
    _, model, plain = trio
    runtime = model._shadowkv
    fullgraph_calls = []
    fullgraph = runtime.inner.fullgraph
    runtime.inner.fullgraph = lambda *a, **k: (fullgraph_calls.append(1), fullgraph(*a, **k))[1]
    try:
        generate(model)
        assert fullgraph_calls, "with no hook the whole-model graph runs"
        seen = []
        handle = model.model.layers[0].mlp.register_forward_hook(lambda m, a, o: seen.append(o.shape[1]))
        fullgraph_calls.clear()
        with_hook = generate(model)
        assert seen == [24] + [1] * (NEW_TOKENS - 1), "a hook added after optimize runs every forward"
        assert not fullgraph_calls, "with a submodule hook the whole-model graph (which would skip it) is not run"
        assert torch.equal(with_hook.sequences, plain.sequences)
        assert shadowkv_fx.pass_report(model).rewritten == model.config.num_hidden_layers
        handle.remove()
        generate(model)  # the fullgraph path's graphs for this prompt length
        before = graphs()
        again = generate(model, new_tokens=2 * NEW_TOKENS)
        assert fullgraph_calls and graphs() == before, "after removal: the fullgraph path, no recompile"
        assert torch.equal(again.sequences[:, :plain.sequences.shape[1]], plain.sequences)
        assert len(seen) == NEW_TOKENS, "a removed hook no longer runs"
    finally:
        runtime.inner.fullgraph = fullgraph


@pytest.mark.parametrize("path", ["model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.o_proj"])
@pytest.mark.parametrize("pre", [False, True])
def test_hook_in_attention_is_refused_before_any_work_naming_it(trio, path, pre):
    _, model, _ = trio
    calls = []
    module = model.get_submodule(path)
    if pre:
        handle = module.register_forward_pre_hook(lambda m, a: calls.append(1))
    else:
        handle = module.register_forward_hook(lambda m, a, o: calls.append(1))
    cache = model._shadowkv.new_cache()
    ids, mask = left_padded(1, [20], 96)
    before = graphs()
    try:
        with pytest.raises(UnsupportedHookError, match=rf"'{path}', inside attention module .*Remove it"):
            with torch.no_grad():
                model(ids, attention_mask=mask, past_key_values=cache)
    finally:
        handle.remove()
    assert not calls and graphs() == before, "refused before the hook or any compile ran"
    assert cache.layout is None, "nothing was prefilled"
    generate(model)  # the model still works once the hook is gone


@pytest.mark.parametrize("register", ["register_module_forward_hook", "register_module_forward_pre_hook"])
def test_module_global_hooks_are_refused_naming_the_register_call(trio, register):
    _, model, _ = trio
    handle = getattr(torch.nn.modules.module, register)(lambda *a: None)
    try:
        with pytest.raises(UnsupportedHookError, match=rf"{register}.*handle.remove\(\)"):
            generate(model)
    finally:
        handle.remove()


def test_optimize_with_hooks_already_registered():
    _, model = tiny_pair("llama", seed=7)
    seen = []
    model.model.layers[1].mlp.register_forward_hook(lambda m, a, o: seen.append(o.shape[1]))
    shadowkv_fx.optimize(model, full(model))
    assert seen == [], "optimize's validation forward is no call of the user's: hooks stay silent"
    generate(model)
    assert seen == [24] + [1] * (NEW_TOKENS - 1)
    before = graphs()
    generate(model, new_tokens=2 * NEW_TOKENS)
    assert graphs() == before, "the hook, silenced for validation, is seen again: no compile per step"
    assert shadowkv_fx.pass_report(model).rewritten == model.config.num_hidden_layers

    _, refused = tiny_pair("llama", seed=7)
    refused.model.layers[0].self_attn.v_proj.register_forward_hook(lambda m, a, o: None)
    with pytest.raises(UnsupportedHookError, match="'model.layers.0.self_attn.v_proj'"):
        shadowkv_fx.optimize(refused, full(refused))
    assert refused._shadowkv is None, "a refused optimize leaves the model as it was"


def test_compiled_backend_generate_runs_hooks_without_recompiles():
    dense, model = tiny_pair("llama", seed=7)
    options = dict(sparse_budget=4096, rank=full_rank(model), chunk_size=4, local_chunks=2, outlier_chunks=2,
                   prefill_rows=None)
    compiled = torch.compile(model, backend="shadowkv", options=options)
    dense_log, log = [], []
    for target, sink in ((dense, dense_log), (model, log)):
        target.model.embed_tokens.register_forward_hook(lambda m, a, o, sink=sink: sink.append(o.shape[1]))
        target.model.layers[1].mlp.register_forward_hook(lambda m, a, o: o * 0.5)
    expected = generate(dense)
    actual = generate(compiled)
    assert log == dense_log
    assert torch.equal(actual.sequences, expected.sequences)
    for a, e in zip(actual.logits, expected.logits):
        assert_close(a, e, atol=2e-4, rtol=1e-4, what="backend='shadowkv' with hooks vs dense with hooks")
    before = graphs()
    generate(compiled, new_tokens=2 * NEW_TOKENS)
    assert graphs() == before, f"{graphs() - before} compiles for more decode steps"


@pytest.mark.parametrize("arch", ["llama", "phi3", "glm4", "qwen3"])  # fused qkv, partial rotary, k_norm
def test_sparse_shadowkv_with_a_layer_hook_equals_it_without(arch):
    """At a real (sparse) budget, hooks change nothing ShadowKV computes, on every architecture."""
    _, model = tiny_pair(arch, seed=2)
    shadowkv_fx.optimize(model, shadowkv_fx.ShadowKVConfig(sparse_budget=8, rank=8, chunk_size=4, local_chunks=1,
                                                           outlier_chunks=1))
    lengths = (40, 33)
    plain = generate(model, new_tokens=2, lengths=lengths)
    seen = []
    handle = model.model.layers[-1].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    hooked = generate(model, new_tokens=2, lengths=lengths)
    handle.remove()
    assert seen == [40, 33, 1], "prefill row by row (prefill_rows=1), then one decode step"
    assert torch.equal(hooked.sequences, plain.sequences)
    for a, e in zip(hooked.logits, plain.logits):
        assert_close(a, e, atol=1e-5, rtol=1e-5, what=f"{arch}: sparse logits with a hook vs without")
