"""The token-chunk pass: which regions it rewrites, that they compute what they replaced, and what it leaves alone."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import shadowkv_fx
from shadowkv_fx import backend, token_chunk_op
from shadowkv_fx.passes.token_chunks import chunk_token_regions
from tests.models import assert_close, left_padded, tiny_pair
from tests.test_equivalence import assert_same_generation, full_config, generate_both

TOKEN_CHUNKED = torch.ops.shadowkv.token_chunked.default
MLP_ARCHS = ["llama", "qwen2", "phi3", "glm4"]  # phi3 and glm4: fused gate_up_proj, then chunk(2, dim=-1)


def capture(fn, *args, dynamic=False, grad=False, **kwargs):
    """The one dynamo graph of ``fn(*args, **kwargs)`` (traced without gradients, as an optimized
    model's forward is, unless ``grad``) and the real arguments it was called with."""
    captured = []

    def backend_fn(gm, example_inputs):
        def run(*graph_args):
            captured.append((gm, graph_args))
            return gm.forward(*graph_args)
        return run

    with torch.set_grad_enabled(grad):
        torch.compile(fn, backend=backend_fn, fullgraph=True, dynamic=dynamic)(*args, **kwargs)
    assert len(captured) == 1
    return captured[0]


def model_graph(model, tokens: int, dynamic=False):
    ids = torch.randint(3, model.config.vocab_size, (2, tokens))
    return capture(model.forward, input_ids=ids, position_ids=torch.arange(tokens)[None].expand(2, -1),
                   use_cache=False, dynamic=dynamic)


def run(gm, args):
    with torch.no_grad():
        return gm(*args)[0]


def mlp_weight_readers(gm) -> set:
    """What reads the MLP weights (dynamo names parameter inputs after their module path)."""
    return {user.target for n in gm.graph.nodes if n.op == "placeholder" and "_modules_mlp_modules_" in n.name for user in n.users}


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("arch", MLP_ARCHS)
def test_one_region_per_layer_and_the_same_outputs(arch, dynamic):
    _, model = tiny_pair(arch, layers=3)
    gm, args = model_graph(model, tokens=37, dynamic=dynamic)
    expected = run(gm, args)
    assert mlp_weight_readers(gm) == {torch._C._nn.linear}

    report = chunk_token_regions(gm, min_tokens=4, chunk_tokens=8)  # 37 = 4 chunks of 8 + 5

    assert (report.matched, report.rewritten, report.skipped) == (3, 3, [])
    ops = [n for n in gm.graph.nodes if n.target is TOKEN_CHUNKED]
    assert len(ops) == 3
    assert len({op.args[2] for op in ops}) == 1, "every layer's MLP is the same code, one registry entry"
    assert F.silu not in [n.target for n in gm.graph.nodes], "the activation moved into the op"
    assert mlp_weight_readers(gm) == {TOKEN_CHUNKED}, "no whole-S MLP intermediate is left"
    assert_close(run(gm, args), expected, atol=1e-5, rtol=1e-5, what=f"{arch} logits")


def test_symbolic_token_count_is_rewritten_whatever_min_tokens():
    """Dynamo marks prefill lengths dynamic after the second one: the op then decides at run time."""
    _, model = tiny_pair("llama")
    gm, args = model_graph(model, tokens=37, dynamic=True)
    expected = run(gm, args)
    report = chunk_token_regions(gm, min_tokens=8192)
    assert report.rewritten == 2
    assert_close(run(gm, args), expected, atol=1e-5, rtol=1e-5, what="logits, one chunk")


@pytest.mark.parametrize("tokens", [1, 4])
def test_decode_and_short_graphs_are_left_exactly_as_they_are(tokens):
    _, model = tiny_pair("phi3")
    gm, _ = model_graph(model, tokens=tokens)
    before = gm.code
    report = chunk_token_regions(gm, min_tokens=4)
    assert gm.code == before
    assert (report.matched, report.rewritten) == (2, 0)
    assert {r.status for r in report.sites} == {"short"}


def test_one_token_past_min_tokens_is_rewritten():
    _, model = tiny_pair("phi3")
    gm, _ = model_graph(model, tokens=5)
    assert chunk_token_regions(gm, min_tokens=4).rewritten == 2


class ToyMLP(torch.nn.Module):
    """A gated MLP written by hand; ``leak`` makes its activation a graph output too."""

    def __init__(self, hidden=16, inner=40, leak=False, widen=True):
        super().__init__()
        inner = inner if widen else hidden // 2
        self.gate, self.up = torch.nn.Linear(hidden, inner), torch.nn.Linear(hidden, inner)
        self.down = torch.nn.Linear(inner, hidden)
        self.leak = leak

    def forward(self, x):
        act = F.gelu(self.gate(x), approximate="tanh")
        out = self.down(act * self.up(x).sigmoid())
        return (out, act.sum()) if self.leak else (out,)


def test_region_whose_intermediate_is_used_elsewhere_is_not_rewritten():
    gm, _ = capture(ToyMLP(leak=True).eval(), torch.randn(2, 37, 16))
    before = gm.code
    report = chunk_token_regions(gm, min_tokens=4, chunk_tokens=8)
    assert (report.matched, report.rewritten) == (1, 0)
    assert "used outside the region" in report.skipped[0].reason
    assert gm.code == before


def test_region_traced_with_gradients_is_not_rewritten():
    """The op has no backward: a graph autograd would differentiate keeps its MLP."""
    gm, _ = capture(ToyMLP().eval(), torch.randn(2, 37, 16), grad=True)
    before = gm.code
    report = chunk_token_regions(gm, min_tokens=4)
    assert (report.matched, report.rewritten) == (1, 0)
    assert "gradients" in report.skipped[0].reason
    assert gm.code == before


def test_region_without_a_widening_linear_is_not_matched():
    gm, _ = capture(ToyMLP(widen=False).eval(), torch.randn(2, 37, 16))
    before = gm.code
    assert chunk_token_regions(gm, min_tokens=4).matched == 0
    assert gm.code == before


def test_hand_written_mlp_with_biases_and_tanh_gelu():
    mlp = ToyMLP().eval()
    x = torch.randn(3, 37, 16)
    gm, args = capture(mlp, x)
    report = chunk_token_regions(gm, min_tokens=4, chunk_tokens=8)
    assert report.rewritten == 1
    assert_close(run(gm, args), run(mlp, (x,)), atol=1e-6, rtol=1e-6, what="toy MLP")


def test_call_module_linears_and_activations():
    """A graph from another tracer (call_module nodes): the region is made functional, weights as inputs."""
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 40), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(40, 16)).eval()
    gm = torch.fx.symbolic_trace(mlp)
    x = torch.randn(2, 37, 16)
    with torch.no_grad():
        FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(x)
    assert chunk_token_regions(gm, min_tokens=4, chunk_tokens=8).rewritten == 1
    assert [n.op for n in gm.graph.nodes].count("call_module") == 0
    with torch.no_grad():
        assert_close(gm(x), mlp(x), atol=1e-6, rtol=1e-6, what="call_module MLP")


@pytest.mark.parametrize("arch", MLP_ARCHS)
def test_optimize_with_chunked_prefill_mlp_generates_the_dense_tokens(arch, monkeypatch):
    seen = []
    original = token_chunk_op.run_in_chunks

    def recording(region, x, *rest):
        seen.append(x.shape[-2])
        return original(region, x, *rest)

    monkeypatch.setattr(token_chunk_op, "run_in_chunks", recording)
    dense, model = tiny_pair(arch)
    shadowkv_fx.optimize(model, dataclasses.replace(full_config(model), prefill_mlp_chunk=8))
    ids, mask = left_padded(2, [41, 30], dense.config.vocab_size, seed=1)
    expected, actual = generate_both(dense, model, ids, mask, new_tokens=5, do_sample=False)
    assert_same_generation(expected, actual)
    assert max(seen) > 8, f"no forward ran its MLP in chunks: token counts {seen}"


def test_shadowkv_backend_chunks_prefill_mlps(monkeypatch):
    monkeypatch.setattr(backend, "inductor_graph", lambda gm, example_inputs, mode=None: gm)
    _, model = tiny_pair("glm4")
    gm, _ = model_graph(model, tokens=37)
    backend.shadowkv_backend(gm, [], options={"prefill_mlp_chunk": 16})
    assert [n.target for n in gm.graph.nodes].count(TOKEN_CHUNKED) == 2


@pytest.mark.parametrize("chunk", [0, -8, True, 2.5, "8192"])
def test_prefill_mlp_chunk_must_be_none_or_a_positive_int(chunk):
    with pytest.raises(ValueError, match="prefill_mlp_chunk"):
        shadowkv_fx.ShadowKVConfig(prefill_mlp_chunk=chunk)


def test_prefill_mlp_chunk_default_and_off():
    assert shadowkv_fx.ShadowKVConfig().prefill_mlp_chunk == 8192
    assert shadowkv_fx.ShadowKVConfig(prefill_mlp_chunk=None).prefill_mlp_chunk is None
    assert shadowkv_fx.ShadowKVConfig(prefill_mlp_chunk=1).prefill_mlp_chunk == 1


def test_a_model_whose_mlp_is_not_found_is_logged(caplog):
    """Preflight sizes the prefill reserve for one chunk of MLP intermediates: a graph with
    attention but no token-wise region says that its prefill holds more."""
    import logging

    from shadowkv_fx.config import ShadowKVConfig
    from shadowkv_fx.passes.token_chunks import chunk_prefill_mlps

    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU()))
    with caplog.at_level(logging.WARNING, logger="shadowkv_fx.passes.token_chunks"):
        assert chunk_prefill_mlps(gm, ShadowKVConfig(), attention_sites=0).matched == 0
        assert not caplog.records, "a graph without attention (a graph break's piece) is not a model"
        chunk_prefill_mlps(gm, ShadowKVConfig(), attention_sites=2)
        assert "no MLP found" in caplog.text
    assert chunk_prefill_mlps(gm, ShadowKVConfig(prefill_mlp_chunk=None), attention_sites=2) is None
