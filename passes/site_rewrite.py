"""One attention site at a time: cut out its key RoPE, put ``torch.ops.shadowkv.attention`` in its place.

``attention_pass.py`` runs these pieces over every site of a graph (and undoes them).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from shadowkv_fx.passes.attention_sites import AttentionSite


def extract_rope(site: AttentionSite, owner: torch.nn.Module) -> fx.GraphModule:
    """Cut the key-RoPE subgraph out as ``rope(k_pre, *rope_inputs) -> k_post``."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {site.k_pre: graph.placeholder("k_pre")}
    for i, node in enumerate(site.rope_inputs):
        env[node] = graph.placeholder(f"rope_input_{i}")

    def size(node: fx.Node) -> fx.Node:
        if node not in env:
            source = site.rope_sizes[node]
            if source is None:
                for arg in node.all_input_nodes:
                    size(arg)
                env[node] = graph.node_copy(node, lambda n: env[n])
            else:
                env[node] = graph.call_function(torch.ops.aten.sym_size.int, (env[source[0]], source[1]))
        return env[node]

    for node in site.rope_sizes:
        size(node)
    for node in site.rope_region:
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[site.k])
    return fx.GraphModule(owner, graph, class_name="KeyRope")


def rewrite_site(gm: fx.GraphModule, site: AttentionSite, layer: int) -> fx.Node:
    """Insert ``torch.ops.shadowkv.attention`` for ``site`` and route the site's users to it.

    Nothing is erased: the dense site stays in the graph, dead, until the caller erases it.

    Returns
    -------
    fx.Node
        The op node, ``[B, Hq, n, Dv]`` like the site's output it replaces.
    """
    from shadowkv_fx import graph_registry, ops  # noqa: F401 (ops registers torch.ops.shadowkv)

    rope_key = graph_registry.register(extract_rope(site, gm))
    with gm.graph.inserting_before(site.output):
        new = gm.graph.call_function(
            torch.ops.shadowkv.attention.default,
            (site.q, site.k_pre, site.v, list(site.rope_inputs), layer, rope_key, site.scale),
        )
    new.meta.update(site.output.meta)
    site.output.replace_all_uses_with(new)
    return new


def dead_nodes(candidates: list[fx.Node]) -> set[fx.Node]:
    """The replaced sites and whatever fed only them (masks, repeat_kv, key RoPE).

    Found without erasing, so the caller can still read these nodes' arguments (``erase_node``
    clears them). A node is dead once every user is: one shared by several sites (a causal-mask
    builder) is dead only when all of them are among the candidates' cones.
    """
    todo, dead = list(candidates), set()
    while todo:
        node = todo.pop()
        if node in dead or node.op in ("placeholder", "output") or any(u not in dead for u in node.users):
            continue
        dead.add(node)
        todo.extend(node.all_input_nodes)
    return dead
