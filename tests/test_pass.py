"""The FX pass on CPU graphs: what it matches, what it rewrites, and what it must leave alone."""
import pytest
import torch
import transformers as T

import shadowkv_fx
from shadowkv_fx.compat import CACHE_ARG
from shadowkv_fx.passes.attention_pass import shadowkv_pass
from tests.models import ARCHS, left_padded, tiny_pair

SDPA = torch._C._nn.scaled_dot_product_attention


def capture(fn, *args, **kwargs) -> torch.fx.GraphModule:
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(fn, backend=backend, fullgraph=True)(*args, **kwargs)
    assert len(graphs) == 1
    return graphs[0]


def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class ToyAttention(torch.nn.Module):
    """A RoPE attention written by hand, with switches that make its keys escape."""

    def __init__(self, leak_keys=False, leak_rope=False, leak_values=False):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(16, 16, bias=False) for _ in range(3))
        self.leak_keys, self.leak_rope, self.leak_values = leak_keys, leak_rope, leak_values

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, 2, 8).transpose(1, 2) for p in (self.q, self.k, self.v))
        k_cos = k * cos
        k_rot = k_cos + torch.cat([-k[..., 4:], k[..., :4]], dim=-1) * sin
        out = SDPA(rope(q, cos, sin), k_rot, v, is_causal=True)
        extras = ()
        if self.leak_keys:
            extras += (k_rot.sum(),)
        if self.leak_rope:
            extras += (k_cos.mean(),)
        if self.leak_values:
            extras += (v.sum(),)
        return (out,) + extras


def toy_inputs():
    x = torch.randn(1, 5, 16)
    angles = torch.arange(5.0)[:, None] * torch.tensor([1.0, 0.1, 0.01, 0.001]).repeat(2)
    return x, angles.cos()[None, None], angles.sin()[None, None]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_one_site_per_layer_and_no_dense_attention_left(arch, attn):
    _, model = tiny_pair(arch, attn=attn, layers=3)
    gm = capture(model.forward, input_ids=torch.randint(3, 90, (1, 7)), position_ids=torch.arange(7)[None], use_cache=False)
    report = shadowkv_pass(gm)
    assert (report.matched, report.rewritten, report.skipped) == (3, 3, [])
    ops = targets(gm)
    assert ops.count(torch.ops.shadowkv.attention.default) == 3
    assert SDPA not in ops and torch.nn.functional.softmax not in ops


def test_disabled_pass_leaves_graph_and_outputs_bit_identical():
    dense, _ = tiny_pair("qwen2", attn="sdpa")
    kwargs = dict(input_ids=torch.randint(3, 90, (2, 9)), position_ids=torch.arange(9)[None].expand(2, -1), use_cache=False)
    gm = capture(dense.forward, **kwargs)
    before = gm.code
    report = shadowkv_pass(gm, enabled=False)
    assert report.matched == 2 and report.rewritten == 0
    assert gm.code == before
    compiled = torch.compile(dense.forward, backend=lambda g, ex: (shadowkv_pass(g, enabled=False), g.forward)[1], fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(**kwargs).logits, dense(**kwargs).logits)


def test_optimize_disabled_generates_exactly_like_the_unmodified_model():
    dense, model = tiny_pair("llama")
    shadowkv_fx.optimize(model, shadowkv_fx.ShadowKVConfig(enabled=False, rank=8))
    ids, mask = left_padded(2, [30, 22], 96)
    args = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        a, b = dense.generate(ids, **args), model.generate(ids, **args)
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))


def test_graph_without_attention_passes_through_unchanged():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    gm = capture(mlp, torch.randn(3, 8))
    before = gm.code
    report = shadowkv_pass(gm)
    assert report.matched == 0 and gm.code == before


def test_toy_attention_is_rewritten_and_its_rope_moves_into_the_op():
    gm = capture(ToyAttention(), *toy_inputs())
    report = shadowkv_pass(gm)
    assert report.rewritten == 1
    assert targets(gm).count(torch.cat) == 1  # only the query's rotate_half remains


@pytest.mark.parametrize("leak", ["leak_keys", "leak_rope", "leak_values"])
def test_site_whose_intermediate_is_used_elsewhere_is_not_rewritten(leak):
    gm = capture(ToyAttention(**{leak: True}), *toy_inputs())
    before = gm.code
    report = shadowkv_pass(gm)
    assert report.rewritten == 0 and len(report.skipped) == 1
    assert "used outside" in report.skipped[0].reason or "also feed" in report.skipped[0].reason
    assert gm.code == before


def test_shape_reads_of_keys_and_values_are_not_leaks():
    """A graph traced with a symbolic size may read the keys' and values' shapes (``repeat_kv``
    under a concurrent compile did): the site is rewritten, the key read moves to the keys before
    RoPE and the value read stays on the values, which the op keeps."""
    gm = capture(ToyAttention(), *toy_inputs())
    sdpa = next(n for n in gm.graph.nodes if n.target is SDPA)
    k_rot, v = sdpa.args[1], sdpa.args[2]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(output):
        reads = [gm.graph.call_method("size", (k_rot, 2)), gm.graph.call_method("size", (v, 2))]
    output.args = (tuple(output.args[0]) + tuple(reads),)
    report = shadowkv_pass(gm)
    assert report.rewritten == 1 and not report.skipped
    key_read, value_read = (r.args[0] for r in reads)
    assert key_read is not k_rot and key_read in gm.graph.nodes, "the key read must move to surviving keys"
    assert value_read is v and v in gm.graph.nodes
    gm.graph.lint()


def test_dense_cache_graph_is_not_rewritten():
    """Captured with a DynamicCache, post-RoPE keys leave the graph for the cache: skip, say why."""
    dense, _ = tiny_pair("llama")
    cache = T.DynamicCache(config=dense.config)
    gm = capture(dense.forward, input_ids=torch.randint(3, 90, (1, 6)), **{CACHE_ARG: cache}, use_cache=True)
    report = shadowkv_pass(gm)
    assert report.rewritten == 0 and len(report.skipped) == 2
    assert all("dense KV cache" in s.reason for s in report.skipped)


def test_model_without_rotary_embeddings_is_refused_with_the_reason():
    cfg = T.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, bos_token_id=0, eos_token_id=0)
    gpt2 = T.GPT2LMHeadModel(cfg).eval()
    with pytest.raises(shadowkv_fx.UnsupportedModelError, match="no rotary embedding"):
        shadowkv_fx.optimize(gpt2, shadowkv_fx.ShadowKVConfig(rank=8))
    assert "forward" not in vars(gpt2), "a refused model is left as it was"
