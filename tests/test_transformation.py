"""The rewrite as an optimum ``ReversibleTransformation``: transform, reverse, compose, on dynamo graphs."""
import copy
import operator

import pytest
import torch
from optimum.fx.optimization import ReversibleTransformation, compose

from shadowkv_fx.passes.attention_pass import ShadowKVAttentionRewrite, shadowkv_pass
from tests.models import ARCHS, assert_close, tiny_pair
from tests.test_pass import SDPA, ToyAttention, capture, targets, toy_inputs

OP = torch.ops.shadowkv.attention.default
DENSE = (SDPA, torch.nn.functional.softmax)
LAYERS = 3


def capture_with_inputs(model, batch=2, seq=7):
    """The forward graph (no KV cache, like ``optimize`` traces it) and the inputs dynamo gave it."""
    graphs, inputs = [], []

    def backend(gm, example_inputs):
        graphs.append(gm)
        inputs.extend(example_inputs)
        return gm.forward

    ids = torch.randint(3, 90, (batch, seq))
    torch.compile(model.forward, backend=backend, fullgraph=True)(
        input_ids=ids, position_ids=torch.arange(seq)[None], use_cache=False)
    (gm,) = graphs
    return gm, inputs


def with_random_ids(gm, inputs, seed):
    """``inputs`` with new random token ids ``[B, S]`` in the ``input_ids`` placeholder's slot."""
    names = [n.name for n in gm.graph.find_nodes(op="placeholder")]
    slot = next(i for i, name in enumerate(names) if "input_ids" in name)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, inputs[slot].shape, generator=g)
    return inputs[:slot] + [ids] + inputs[slot + 1:]


def run(gm, inputs):
    with torch.no_grad():
        return torch.cat([t.flatten() for t in torch.utils._pytree.tree_leaves(gm(*inputs))])


class SiluAsSigmoidProduct(ReversibleTransformation):
    """``silu(x)`` -> ``x * sigmoid(x)``, keeping the node (its users and name) so reverse is exact."""

    preserves_computation = True

    def transform(self, graph_module):
        for node in graph_module.graph.find_nodes(op="call_function", target=torch.nn.functional.silu):
            (x,) = node.args
            with graph_module.graph.inserting_before(node):
                sigmoid = graph_module.graph.call_function(torch.sigmoid, (x,))
            node.target, node.args, node.kwargs = operator.mul, (x, sigmoid), {}
            self.mark_as_transformed(node)
        return graph_module

    def reverse(self, graph_module):
        for node in self.get_transformed_nodes(graph_module):
            x, sigmoid = node.args
            node.target, node.args = torch.nn.functional.silu, (x,)
            graph_module.graph.erase_node(sigmoid)
            self.mark_as_restored(node)
        return graph_module


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_reverse_restores_the_dense_graph_outputs(arch, attn):
    _, model = tiny_pair(arch, attn=attn, layers=LAYERS)
    gm, inputs = capture_with_inputs(model)
    original = copy.deepcopy(gm)
    dense_ops = [t for t in targets(gm) if t in DENSE]
    rewrite = ShadowKVAttentionRewrite()

    rewrite(gm)
    assert (rewrite.report.matched, rewrite.report.rewritten) == (LAYERS, LAYERS)
    assert targets(gm).count(OP) == LAYERS and not set(targets(gm)) & set(DENSE)
    assert len(rewrite.get_transformed_nodes(gm)) == LAYERS

    rewrite(gm, reverse=True)
    assert OP not in targets(gm) and not rewrite.get_transformed_nodes(gm)
    assert [t for t in targets(gm) if t in DENSE] == dense_ops
    feed = with_random_ids(gm, inputs, seed=0)  # ids other than the captured ones
    assert_close(run(gm, feed), run(original, feed), atol=1e-6, rtol=1e-6, what=f"{arch}/{attn} reversed")


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_composes_with_another_transformation_and_reverses_in_order(arch):
    _, model = tiny_pair(arch, attn="eager", layers=2)
    gm, inputs = capture_with_inputs(model)
    original = copy.deepcopy(gm)
    silu = torch.nn.functional.silu
    both = compose(ShadowKVAttentionRewrite(), SiluAsSigmoidProduct())
    assert isinstance(both, ReversibleTransformation) and not both.preserves_computation

    both(gm)
    ops = targets(gm)
    assert ops.count(OP) == 2 and silu not in ops and ops.count(torch.sigmoid) == 2

    both(gm, reverse=True)
    ops = targets(gm)
    assert OP not in ops and torch.sigmoid not in ops and ops.count(silu) == 2
    feed = with_random_ids(gm, inputs, seed=0)
    assert_close(run(gm, feed), run(original, feed), atol=1e-6, rtol=1e-6, what=f"{arch} composed+reversed")


def test_report_matches_shadowkv_pass():
    _, model = tiny_pair("qwen2", attn="sdpa")
    gm, _ = capture_with_inputs(model)
    rewrite = ShadowKVAttentionRewrite(enabled=False)
    rewrite(copy.deepcopy(gm))
    assert [s.status for s in rewrite.report.sites] == ["disabled", "disabled"]
    assert rewrite.report.sites == shadowkv_pass(copy.deepcopy(gm), enabled=False).sites
    rewrite = ShadowKVAttentionRewrite()
    rewrite(copy.deepcopy(gm))
    assert rewrite.report.sites == shadowkv_pass(gm).sites and rewrite.report.rewritten == 2


def test_escaping_keys_leave_the_graph_unchanged_through_transform_and_reverse():
    gm = capture(ToyAttention(leak_keys=True), *toy_inputs())
    before = gm.code
    rewrite = ShadowKVAttentionRewrite()
    rewrite(gm)
    assert rewrite.report.rewritten == 0 and len(rewrite.report.skipped) == 1
    assert gm.code == before
    rewrite(gm, reverse=True)
    assert gm.code == before


def test_only_the_transforming_instance_can_reverse():
    gm = capture(ToyAttention(), *toy_inputs())
    shadowkv_pass(gm)
    with pytest.raises(ValueError, match="another ShadowKVAttentionRewrite"):
        ShadowKVAttentionRewrite()(gm, reverse=True)
