"""Find attention sites in a dynamo FX graph by shape, not by model class.

A site is ``linear(k or qkv) -> layout ops [-> k-norm] -> RoPE(k, per-position tables) ->
[repeat_kv] -> attention(q, k, v)`` where attention is SDPA or eager
``matmul -> scale -> [+mask] -> softmax -> [to] -> [dropout] -> matmul``.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

SDPA_TARGETS = {torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention}
SOFTMAX_TARGETS = {torch.nn.functional.softmax, torch.softmax, torch.Tensor.softmax, "softmax"}
MATMUL_TARGETS = {torch.matmul, operator.matmul, "matmul"}
LINEAR_TARGETS = {torch._C._nn.linear, torch.nn.functional.linear, torch.addmm, torch.mm, torch.matmul}


@dataclass
class AttentionSite:
    """One attention in the graph, and what the rewrite needs from it."""

    attention: fx.Node
    output: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    scale: float | fx.Node | None  # a node when dynamo lifted the module's scaling into an input
    removed: list[fx.Node] = field(default_factory=list)
    k_proj: fx.Node | None = None
    k_pre: fx.Node | None = None
    rope_region: list[fx.Node] = field(default_factory=list)
    rope_inputs: list[fx.Node] = field(default_factory=list)
    # symbolic sizes the key RoPE reads (a view's shape under a dynamic sequence length): each is
    # recomputed from a dim of ``k_pre`` or of a RoPE input, ``(tensor, dim)``, or from other sizes
    rope_sizes: dict[fx.Node, tuple[fx.Node, int] | None] = field(default_factory=dict)
    skip_reason: str | None = None

    @property
    def name(self) -> str:
        weight = self.k_proj.args[1] if self.k_proj is not None and len(self.k_proj.args) > 1 else None
        return getattr(weight, "name", self.attention.name)


def _is(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and node.target in targets


def _shape(node: fx.Node):
    val = node.meta.get("example_value", node.meta.get("val"))
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _is_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("example_value", node.meta.get("val")), torch.Tensor)


def _resolve_sizes(sizes: list[fx.Node], tensors: list[fx.Node]) -> dict | str:
    """Map each symbolic size node to ``(tensor, dim)`` of equal size, or to None where it is an
    expression of other such sizes (then copied); a reason string when one cannot be rebuilt."""
    dims = {}
    for t in tensors:
        for d, size in enumerate(t.meta.get("example_value", t.meta.get("val")).shape):
            if isinstance(size, torch.SymInt):
                dims.setdefault(str(size.node.expr), (t, d))
    found: dict = {}
    todo = list(sizes)
    while todo:
        node = todo.pop()
        if node in found:
            continue
        val = node.meta.get("example_value", node.meta.get("val"))
        key = str(val.node.expr) if isinstance(val, torch.SymInt) else None
        if key in dims:
            found[node] = dims[key]
        elif node.op == "call_function" and isinstance(val, (torch.SymInt, int)):
            found[node] = None
            todo.extend(node.all_input_nodes)
        else:
            return f"the key RoPE reads size {node.name}, which is not a size of its inputs"
    return found


def _is_shape_query(node: fx.Node) -> bool:
    """``x.size(...)``, ``x.dim()``, ``x.shape`` or ``sym_size``: a read of a tensor's shape alone
    (a graph traced with a symbolic length asks the keys for it)."""
    if node.op == "call_method":
        return node.target in ("size", "dim")
    return node.op == "call_function" and (
        node.target is torch.ops.aten.sym_size.int
        or (node.target is getattr and len(node.args) > 1 and node.args[1] == "shape"))


def _is_scalar(node) -> bool:
    """A float that dynamo lifted out of the module (``self.scaling.item()``)."""
    return isinstance(node, fx.Node) and isinstance(node.meta.get("example_value"), (float, torch.SymFloat))


def _strip_repeat_kv(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """``reshape(expand(x[:, :, None]))`` is transformers' ``repeat_kv``: look through it."""
    chain = []
    if node.op == "call_method" and node.target == "reshape":
        expand = node.args[0]
        if isinstance(expand, fx.Node) and expand.op == "call_method" and expand.target == "expand":
            item = expand.args[0]
            if _is(item, {operator.getitem}) and isinstance(item.args[1], tuple) and None in item.args[1]:
                chain = [node, expand, item]
                node = item.args[0]
    return node, chain


def find_sdpa_sites(graph: fx.Graph) -> list[AttentionSite]:
    sites = []
    for node in graph.nodes:
        if not _is(node, SDPA_TARGETS):
            continue
        q, k, v = node.args[:3]
        kw = node.kwargs
        site = AttentionSite(node, node, q, k, v, kw.get("scale"), removed=[node])
        if float(kw.get("dropout_p", 0.0) or 0.0) != 0.0:
            site.skip_reason = "attention dropout is on (model in training mode?)"
        sites.append(site)
    return sites


def find_eager_sites(graph: fx.Graph) -> list[AttentionSite]:
    """``softmax(matmul(q, k^T) * s [+ m]) [-> to] [-> dropout] -> matmul(., v)``."""
    sites = []
    for sm in graph.nodes:
        if not _is(sm, SOFTMAX_TARGETS):
            continue
        removed = [sm]
        pre = sm.args[0]
        if _is(pre, {operator.add}) and len(pre.users) == 1:
            removed.append(pre)
            pre = pre.args[0]
        scale = None
        if _is(pre, {operator.mul, operator.truediv}):
            factor = pre.args[1]
            if isinstance(factor, (int, float)):
                scale = float(factor) if pre.target is operator.mul else 1.0 / float(factor)
            elif pre.target is operator.mul and _is_scalar(factor):
                scale = factor
            if scale is not None:
                removed.append(pre)
                pre = pre.args[0]
        if not _is(pre, MATMUL_TARGETS) or scale is None:
            continue
        removed.append(pre)
        q, kt = pre.args[:2]
        if not (isinstance(kt, fx.Node) and kt.op == "call_method" and kt.target == "transpose" and set(kt.args[1:]) in ({2, 3}, {-1, -2})):
            continue
        removed.append(kt)
        post = sm
        while len(post.users) == 1:
            (user,) = post.users
            if user.op == "call_method" and user.target == "to" or _is(user, {torch.nn.functional.dropout}):
                removed.append(user)
                post = user
                continue
            break
        out = next((u for u in post.users if _is(u, MATMUL_TARGETS) and u.args[0] is post), None)
        if out is None:
            continue
        site = AttentionSite(out, out, q, kt.args[0], out.args[1], scale, removed=removed + [out])
        if len(sm.users) != 1 or any(len(n.users) != 1 for n in removed[1:-1] if n is not kt):
            site.skip_reason = "attention weights are used outside the attention (output_attentions?)"
        sites.append(site)
    return sites


def _ancestors(node: fx.Node, stop=lambda n: False) -> set[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                if not stop(a):
                    todo.append(a)
    return seen


def _forward(src: fx.Node, allowed: set[fx.Node]) -> set[fx.Node]:
    """Nodes reachable from ``src`` through users inside ``allowed`` (``src`` excluded)."""
    seen, todo = set(), [src]
    while todo:
        for u in todo.pop().users:
            if u in allowed and u not in seen:
                seen.add(u)
                todo.append(u)
    return seen


def _reaches(src: fx.Node, dst: fx.Node, allowed: set[fx.Node]) -> bool:
    todo, seen = [src], {src}
    while todo:
        n = todo.pop()
        if n is dst:
            return True
        for u in n.users:
            if u in allowed and u not in seen:
                seen.add(u)
                todo.append(u)
    return False


def locate_rope(site: AttentionSite) -> None:
    """Fill ``k_proj``, ``k_pre``, ``rope_region`` and ``rope_inputs`` of a site, or a skip reason."""
    k_post, repeat_chain = _strip_repeat_kv(site.k)
    v, v_chain = _strip_repeat_kv(site.v)
    site.k, site.v = k_post, v
    site.removed += repeat_chain + v_chain
    up = _ancestors(k_post, stop=lambda n: _is(n, LINEAR_TARGETS))
    projections = [n for n in up if _is(n, LINEAR_TARGETS)]
    if not projections:
        site.skip_reason = "no linear key projection feeds the attention keys"
        return
    order = {n: i for i, n in enumerate(k_post.graph.nodes)}
    site.k_proj = max(projections, key=order.__getitem__)
    path = _forward(site.k_proj, up | {k_post}) | {site.k_proj}
    dominators = [
        n for n in sorted(path, key=order.__getitem__)
        if n not in (site.k_proj, k_post) and not _reaches(site.k_proj, k_post, path - {n})
    ]
    for cut in reversed([site.k_proj] + dominators):
        region_set = _forward(cut, path)
        region = sorted(region_set, key=order.__getitem__)
        externals = []
        for n in region:
            for a in n.all_input_nodes:
                if a is not cut and a not in region_set and a not in externals:
                    externals.append(a)
        tensors = [a for a in externals if _is_tensor(a)]
        if tensors:
            site.k_pre, site.rope_region = cut, region
            site.rope_inputs = sorted(tensors, key=order.__getitem__)
            sizes = _resolve_sizes([a for a in externals if not _is_tensor(a)], [cut] + site.rope_inputs)
            if isinstance(sizes, str):
                site.skip_reason = sizes
                return
            site.rope_sizes = sizes
            break
    if site.k_pre is None or site.k_pre is site.k_proj:
        site.skip_reason = (
            "no rotary embedding between the key projection and the attention (learned or absolute "
            "positions?): ShadowKV rebuilds keys before RoPE"
        )
        return
    _check_rope(site)


def _check_rope(site: AttentionSite) -> None:
    k_shape, post_shape = _shape(site.k_pre), _shape(site.k)
    if k_shape is None or len(k_shape) != 4 or k_shape != post_shape:
        site.skip_reason = f"keys around RoPE are not [B, H, S, D] of one shape ({k_shape} -> {post_shape})"
        return
    for node in site.rope_region:
        if _is(node, {torch.cat}) and node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0) in (2, -2):
            site.skip_reason = f"keys are concatenated along the sequence ({node.name}) with a dense KV cache"
            return
    for node in site.rope_inputs:
        shape = _shape(node)
        if shape is None or len(shape) != 4 or shape[1] != 1:
            site.skip_reason = f"RoPE input {node.name} is not a per-position table [B, 1, S, c] (shape {shape})"
            return
    region = set(site.rope_region)
    for node in site.rope_region:
        if node is site.k:
            continue
        if any(u not in region for u in node.users):
            site.skip_reason = f"RoPE intermediate {node.name} is used outside the key path"
            return
    for user in list(site.k.users):
        if _is_shape_query(user):  # reads only the shape, which the keys before RoPE share
            user.replace_input_with(site.k, site.k_pre)
    allowed = set(site.removed)
    leaks = [u.name for u in site.k.users if u not in allowed]
    if leaks:
        site.skip_reason = f"post-RoPE keys also feed {leaks} (a dense KV cache?)"
        return
    # the values stay in the graph (the op stores them), so a read of their shape stays valid
    leaks = [u.name for u in site.v.users if u not in allowed and not _is_shape_query(u)]
    if leaks:
        site.skip_reason = f"values also feed {leaks} (a dense KV cache?)"


def find_attention_sites(graph: fx.Graph) -> list[AttentionSite]:
    """Every attention of the graph in execution order, each located or given a skip reason."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    sites = sorted(find_sdpa_sites(graph) + find_eager_sites(graph), key=lambda s: order[s.attention])
    for site in sites:
        if site.skip_reason is None:
            locate_rope(site)
        if site.scale is None and site.skip_reason is None:
            shape = _shape(site.q)
            site.scale = 1.0 / math.sqrt(shape[-1]) if shape else None
    return sites
