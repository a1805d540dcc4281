"""The ShadowKV attention pass over a whole graph, as an ``optimum.fx.optimization.ReversibleTransformation``.

``transform`` swaps every matched attention site for ``torch.ops.shadowkv.attention``, one site
at a time (``site_rewrite.py``); ``reverse`` puts the dense attention back, node for node, so the
reversed graph computes what the captured one did. Both compose with optimum's ``compose`` and
other transformations. ``shadowkv_pass`` runs the transformation once.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx
from optimum.fx.optimization import ReversibleTransformation

from shadowkv_fx.passes.attention_sites import find_attention_sites
from shadowkv_fx.passes.report import PassReport, SiteReport
from shadowkv_fx.passes.site_rewrite import dead_nodes, rewrite_site

log = logging.getLogger(__name__)

_SIGNATURES = itertools.count()


@dataclass(frozen=True)
class DenseCone:
    """What one op node replaced: the nodes ``transform`` erased that computed the site's output.

    Attributes
    ----------
    module
        ``(*live) -> out``, ``out`` being the site's dense output ``[B, Hq, n, Dv]``. Holds the
        site's attention, its key RoPE and repeat_kv, and whatever else fed only erased nodes
        (a causal-mask builder shared by every layer is in every layer's cone).
    live
        The transformed graph's nodes that feed ``module``, one per placeholder, in order:
        q, k_pre, v, RoPE tables, graph inputs, sym sizes, ...
    """

    module: fx.GraphModule
    live: tuple[fx.Node, ...]


def dense_cone(gm: fx.GraphModule, out: fx.Node, dead: set[fx.Node], order: dict[fx.Node, int]) -> DenseCone:
    """Copy what computed ``out`` among ``dead`` into a standalone module, before it is erased."""
    members, live, todo = set(), set(), [out]
    while todo:
        node = todo.pop()
        if node in members:
            continue
        members.add(node)
        for arg in node.all_input_nodes:
            if arg in dead:
                todo.append(arg)
            else:
                live.add(arg)
    graph, env = fx.Graph(), {}
    inputs = tuple(sorted(live, key=order.__getitem__))
    for node in inputs:
        env[node] = graph.placeholder(node.name)
        env[node].meta = dict(node.meta)  # example values, so the cone describes its inputs
    for node in sorted(members, key=order.__getitem__):
        env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(env[out])
    return DenseCone(fx.GraphModule(gm, graph, class_name="DenseAttention"), inputs)


class ShadowKVAttentionRewrite(ReversibleTransformation):
    """Swap each attention site of a dynamo graph for ``torch.ops.shadowkv.attention``.

    Sites are matched by graph shape (``attention_sites.py``), not by module type: the graphs
    come from dynamo, since transformers 5 removed Hugging Face's own fx tracer.

    Parameters
    ----------
    enabled
        ``False`` only reports the sites and leaves the graph as it is.

    Attributes
    ----------
    report : PassReport
        What the last ``transform`` did, one entry per site in execution order.

    Notes
    -----
    Only the instance that transformed a graph can reverse it: the erased dense cones are kept
    here, keyed by op node. Not on the graph module: AOTAutograd pickles a module's ``__dict__``
    into its cache key, and graph nodes there make the cache bypass every compile. Not in
    ``node.meta`` either, which inductor may copy around.
    """

    preserves_computation = False  # the op reads and fills a ShadowKV cache, not dense KV

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.report = PassReport()
        self._cones: dict[fx.Node, DenseCone] = {}
        self._signature = next(_SIGNATURES)

    @property
    def signature(self) -> int:
        # optimum hashes every attribute, but the report and cones are unhashable and change;
        # and only this instance holds the cones its reverse needs, so it marks nodes as its own
        return hash((type(self).__qualname__, self._signature))

    def transform(self, graph_module: fx.GraphModule) -> fx.GraphModule:
        """Rewrite every matched site in place (unless disabled) and set ``self.report``.

        Each op node ``[B, Hq, n, Dv]`` takes the place of the site's dense output; the site, its
        key RoPE and whatever fed only erased nodes are erased, after being kept as a ``DenseCone``.
        """
        graph = graph_module.graph
        self.report, rewritten = PassReport(), []
        for index, site in enumerate(find_attention_sites(graph)):
            if site.skip_reason:
                self.report.sites.append(SiteReport(site.name, "skipped", site.skip_reason, index))
            elif not self.enabled:
                self.report.sites.append(SiteReport(site.name, "disabled", index=index))
            else:
                op = rewrite_site(graph_module, site, layer=len(rewritten))
                self.mark_as_transformed(op)
                rewritten.append((op, site))
                self.report.sites.append(SiteReport(site.name, "rewritten", index=index))
        dead = dead_nodes([n for _, site in rewritten for n in site.removed + site.rope_region])
        order = {n: i for i, n in enumerate(graph.nodes)}
        # cut the cones once every site is rewritten (the final dead set), before erasing them
        for op, site in rewritten:
            self._cones[op] = dense_cone(graph_module, site.output, dead, order)
        for node in sorted(dead, key=order.__getitem__, reverse=True):  # users before inputs
            graph.erase_node(node)
        log.info("shadowkv pass: %s", self.report)
        return graph_module

    def reverse(self, graph_module: fx.GraphModule) -> fx.GraphModule:
        """Inline each op node's ``DenseCone`` before it, route the op's users to it, erase the op."""
        graph = graph_module.graph
        foreign = [n.name for n in graph.nodes
                   if n.target is torch.ops.shadowkv.attention.default and n not in self._cones]
        if foreign:
            raise ValueError(f"{foreign} were rewritten by another ShadowKVAttentionRewrite: only it can reverse them")
        present, restored = set(graph.nodes), {}
        for op in self.get_transformed_nodes(graph_module):
            cone = self._cones.pop(op)
            # a cone may read another site's op node: by now, that site's dense output
            live = [restored.get(n, n) for n in cone.live]
            missing = [n.name for n in live if n not in present]
            if missing:
                raise ValueError(f"nodes {missing} that {op.name}'s dense attention reads are gone: "
                                 "reverse later transformations first (compose does)")
            copies = {p: n for p, n in zip(cone.module.graph.find_nodes(op="placeholder"), live)}
            with graph.inserting_before(op):
                dense = graph.graph_copy(cone.module.graph, copies)
            present.update(copies.values())
            op.replace_all_uses_with(dense)
            self.mark_as_restored(op)
            graph.erase_node(op)
            restored[op] = dense
        return graph_module


def shadowkv_pass(gm: fx.GraphModule, enabled: bool = True) -> PassReport:
    """Rewrite ``gm`` in place. With ``enabled=False`` only report the sites."""
    transformation = ShadowKVAttentionRewrite(enabled)
    transformation(gm)
    return transformation.report


def pass_uuid(folder: Path = Path(__file__).parent) -> str:
    """Changes whenever the pass's source does, so inductor's cache keys on it."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()
