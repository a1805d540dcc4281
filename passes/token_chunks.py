"""Run the token-wise regions of long prefills (a model's MLP) a chunk of tokens at a time.

Why: at a 122K-token prefill of a Llama-3.1-8B-shaped model, one sequence's prefill working set is
~15 GiB, ~10 GiB of it the MLP's intermediates (the ``gate_proj`` and ``up_proj`` outputs
``[1, S, 14336]`` in bf16 are 3.3 GiB each, and ``act(gate) * up`` is a third). The device memory
kept aside for that working set is memory that cannot hold more sequences' values. Every op of an
MLP is a function of one token's hidden state, so running it over 8192 tokens at a time, each
chunk's result written into one preallocated output, computes the same thing in well under 1 GiB.
This pass finds such regions by graph shape (``down(f(x))`` where ``f`` holds only linears with
parameter weights, activations, elementwise arithmetic, last-dim chunk/split/slicing and dtype
casts, and at least one widening linear), cuts each out as its own module and calls
``torch.ops.shadowkv.token_chunked`` in its place. Numerics: per-token math is unchanged, but a GEMM
over a chunk of rows may pick a different cuBLAS algorithm (tile shape, split-K) than the one over
all rows, so on the GPU long-prompt results can differ from the unchunked graph in the last bits.
Graphs whose token count is static and at most ``min_tokens`` (decode steps, short prompts) are
left exactly as they are.
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from shadowkv_fx.passes.report import PassReport, SiteReport

log = logging.getLogger(__name__)

# addmm/mm/matmul take the weight transposed or not at all: nn.Linear traces to F.linear
LINEARS = {torch._C._nn.linear, F.linear}
# activations, and the unary pieces of written-out ones (tanh/erf GELU)
ACTIVATIONS = {F.silu, F.gelu, F.relu, F.sigmoid, F.tanh, torch.relu, torch.sigmoid, torch.tanh, torch.erf,
               torch.exp, torch.neg, operator.neg}
ACTIVATION_METHODS = {"silu", "gelu", "relu", "sigmoid", "tanh", "erf", "exp", "neg"}
ACTIVATION_MODULES = {torch.nn.SiLU: F.silu, torch.nn.ReLU: F.relu, torch.nn.Sigmoid: torch.sigmoid,
                      torch.nn.Tanh: torch.tanh, torch.nn.GELU: F.gelu}
ELEMENTWISE = {operator.mul, operator.add, operator.sub, operator.truediv, operator.pow, torch.mul, torch.add,
               torch.sub, torch.div, torch.pow}
ELEMENTWISE_METHODS = {"mul", "add", "sub", "div", "pow", "__mul__", "__add__", "__sub__", "__truediv__", "__rmul__",
                       "__radd__"}
SPLITS = {torch.chunk, torch.split}
SPLIT_METHODS = {"chunk", "split"}
CAST_METHODS = {"to", "float", "half", "bfloat16", "double", "type", "contiguous"}
MAX_REGION_NODES = 256


@dataclass
class TokenRegion:
    """``x -> ... -> down``: the nodes (in graph order, ``down`` last) computed from ``x`` alone."""

    x: fx.Node
    down: fx.Node
    nodes: list[fx.Node]
    params: list[fx.Node | str]  # graph nodes, or attribute paths of ``call_module`` linears

    @property
    def name(self) -> str:
        weight = self.down.args[1] if self.down.op == "call_function" and len(self.down.args) > 1 else None
        return getattr(weight, "name", str(self.down.target) if self.down.op == "call_module" else self.down.name)


def _value(node) -> object:
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None


def _is_param(node, max_dim: int | None = None) -> bool:
    """A weight: a graph input or attribute, not computed in the graph."""
    if not isinstance(node, fx.Node) or node.op not in ("placeholder", "get_attr"):
        return False
    value = _value(node)
    if max_dim is None:
        return True
    return isinstance(value, torch.Tensor) and value.dim() <= max_dim


def _is_last_dim(dim, node: fx.Node) -> bool:
    value = _value(node)
    return dim == -1 or (isinstance(value, torch.Tensor) and dim == value.dim() - 1)


def _is_last_dim_slice(index, node: fx.Node) -> bool:
    """``t[..., a:b]`` or ``t[:, :, a:b]`` (static bounds): every token keeps its own features."""
    value = _value(node)
    if not isinstance(index, tuple) or not index or not isinstance(index[-1], slice):
        return False
    if any(isinstance(v, fx.Node) for v in (index[-1].start, index[-1].stop, index[-1].step)):
        return False
    head = index[:-1]
    if head == (Ellipsis,):
        return True
    full = slice(None, None, None)
    return isinstance(value, torch.Tensor) and len(index) == value.dim() and all(i == full for i in head)


def _no_nodes(values) -> bool:
    return not any(isinstance(v, fx.Node) for v in values)


def _step(gm: fx.GraphModule, node: fx.Node) -> tuple[list[fx.Node], list[fx.Node | str], bool] | None:
    """``(activation inputs, parameters, widens)`` if ``node`` acts on each token alone, else None."""
    target, args, kwargs = node.target, node.args, node.kwargs
    if node.op == "call_function" and target in LINEARS:
        act = args[0] if args else kwargs.get("input")
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        value = _value(weight)
        if not _is_param(weight) or not isinstance(value, torch.Tensor) or value.dim() != 2:
            return None
        if bias is not None and not _is_param(bias):
            return None
        return [act], [p for p in (weight, bias) if p is not None], value.shape[0] > value.shape[1]
    if node.op == "call_module":
        module = gm.get_submodule(target)
        if type(module) is torch.nn.Linear:
            params = [f"{target}.weight"] + ([f"{target}.bias"] if module.bias is not None else [])
            return [args[0]], params, module.out_features > module.in_features
        if type(module) in ACTIVATION_MODULES:
            return [args[0]], [], False
        return None
    if (node.op == "call_function" and target in ACTIVATIONS) or (node.op == "call_method" and target in ACTIVATION_METHODS):
        return ([args[0]], [], False) if _no_nodes(args[1:]) and _no_nodes(kwargs.values()) else None
    if (node.op == "call_function" and target in ELEMENTWISE) or (node.op == "call_method" and target in ELEMENTWISE_METHODS):
        acts, params = [], []
        for arg in list(args) + list(kwargs.values()):
            if not isinstance(arg, fx.Node):
                continue
            # a 0-/1-D weight broadcasts along the feature dim: a per-feature scale, the same for every token
            if _is_param(arg, max_dim=1):
                params.append(arg)
            elif isinstance(_value(arg), torch.Tensor):
                acts.append(arg)
            else:
                return None  # a symbolic scalar: not a tensor the op could take
        return acts, params, False
    if _is_split(node):
        dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
        if _no_nodes(args[1:]) and _no_nodes(kwargs.values()) and _is_last_dim(dim, args[0]):
            return [args[0]], [], False
        return None
    if node.op == "call_function" and target is operator.getitem:
        source, index = args
        if _is_split(source) and isinstance(index, int):
            return [source], [], False
        if _is_last_dim_slice(index, source):
            return [source], [], False
        return None
    if node.op == "call_method" and target in CAST_METHODS:
        rest = list(args[1:]) + list(kwargs.values())
        if target in ("to", "type") and not all(isinstance(v, (torch.dtype, bool)) for v in rest):
            return None  # a device move or a copy of another tensor's layout
        return ([args[0]], [], False) if _no_nodes(rest) else None
    return None


def _is_split(node) -> bool:
    return isinstance(node, fx.Node) and (
        (node.op == "call_function" and node.target in SPLITS) or (node.op == "call_method" and node.target in SPLIT_METHODS)
    )


def _is_linear(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)) is torch.nn.Linear
    return node.op == "call_function" and node.target in LINEARS


def find_region(gm: fx.GraphModule, down: fx.Node, order: dict[fx.Node, int]) -> TokenRegion | None:
    """The token-wise region ending at linear ``down``, or None.

    Walks back from ``down``, always expanding the latest pending input, until one node is left
    pending and a widening linear has been passed: that node is ``x``, the nearest single input
    every region node derives from. Reaching a node that is not token-wise first means no region.
    """
    first = _step(gm, down) if _is_linear(gm, down) else None
    if first is None:
        return None
    nodes, params, pending = {down}, list(first[1]), set(first[0])
    widened = False
    while not (len(pending) == 1 and widened):
        if not pending or len(nodes) > MAX_REGION_NODES:
            return None
        node = max(pending, key=order.__getitem__)
        step = _step(gm, node) if node.op != "placeholder" else None
        if step is None:
            return None
        acts, node_params, widens = step
        pending.discard(node)
        nodes.add(node)
        pending.update(acts)
        params += [p for p in node_params if p not in params]
        widened |= widens
    (x,) = pending
    params = sorted(dict.fromkeys(params), key=lambda p: order.get(p, len(order)))  # graph order, attribute paths last
    return TokenRegion(x, down, sorted(nodes, key=order.__getitem__), params)


def extract_region(region: TokenRegion) -> fx.GraphModule:
    """Cut ``region`` out as a stateless ``(x, *params) -> out`` module (call_modules made functional).

    Nodes are renamed by position, so the same region in every layer (and every model of one
    architecture) has the same code, hence one registry entry.
    """
    graph = fx.Graph()
    env: dict[object, fx.Node] = {region.x: graph.placeholder("x")}
    for i, param in enumerate(region.params):
        env[param] = graph.placeholder(f"param_{i}")
    root = region.down.graph.owning_module
    for i, node in enumerate(region.nodes):
        args = fx.map_arg(node.args, env.__getitem__)
        kwargs = fx.map_arg(node.kwargs, env.__getitem__)
        if node.op == "call_module":
            module = root.get_submodule(node.target)
            if isinstance(module, torch.nn.Linear):
                bias = env[f"{node.target}.bias"] if module.bias is not None else None
                args, kwargs = (args[0], env[f"{node.target}.weight"], bias), {}
                env[node] = graph.create_node("call_function", torch._C._nn.linear, args, kwargs, name=f"t{i}")
                continue
            function = ACTIVATION_MODULES[type(module)]
            kwargs = {"approximate": module.approximate} if isinstance(module, torch.nn.GELU) else {}
            env[node] = graph.create_node("call_function", function, args, kwargs, name=f"t{i}")
            continue
        env[node] = graph.create_node(node.op, node.target, args, kwargs, name=f"t{i}")
    graph.output(env[region.down])
    return fx.GraphModule(torch.nn.Module(), graph, class_name="TokenRegion")


def _escapes(region: TokenRegion) -> list[str]:
    """Region nodes (other than ``down``) read outside it: their whole-S value must exist anyway."""
    inside = set(region.nodes)
    return [n.name for n in region.nodes if n is not region.down and any(u not in inside for u in n.users)]


def _skip_reason(region: TokenRegion, min_tokens: int) -> tuple[str, str] | None:
    """``(status, reason)`` when ``region`` stays as it is, else None."""
    escaped = _escapes(region)
    if escaped:
        return "skipped", f"intermediates {escaped} are used outside the region"
    x, out = _value(region.x), _value(region.down)
    if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor):
        return "skipped", "no example value on its input or output (not a dynamo/make_fx graph)"
    if out.requires_grad:
        return "skipped", "traced with gradients on (the chunked op has no backward): trace under torch.no_grad()"
    if x.dim() != 3:
        return "skipped", f"input {region.x.name} is {x.dim()}-D, not [B, S, H]"
    tokens = x.shape[-2]
    if not isinstance(tokens, torch.SymInt) and tokens <= min_tokens:
        return "short", f"{tokens} tokens <= min_tokens={min_tokens}"
    return None


def rewrite_region(gm: fx.GraphModule, region: TokenRegion, chunk_tokens: int) -> fx.Node:
    """Call ``torch.ops.shadowkv.token_chunked`` in place of ``region.down`` and erase the region."""
    from shadowkv_fx import graph_registry, token_chunk_op  # noqa: F401 (token_chunk_op registers the op)

    key = graph_registry.register(extract_region(region))
    out = _value(region.down)
    graph = gm.graph
    with graph.inserting_before(region.down):
        params = [graph.get_attr(p) if isinstance(p, str) else p for p in region.params]
        op = graph.call_function(
            torch.ops.shadowkv.token_chunked.default,
            (region.x, params, key, chunk_tokens, int(out.shape[-1]), out.dtype),
        )
    op.meta.update(region.down.meta)
    region.down.replace_all_uses_with(op)
    for node in reversed(region.nodes):  # users before inputs: the whole-S intermediates go
        graph.erase_node(node)
    return op


def chunk_token_regions(gm: fx.GraphModule, min_tokens: int, chunk_tokens: int | None = None) -> PassReport:
    """Rewrite ``gm`` in place: each token-wise region runs ``chunk_tokens`` tokens at a time.

    Parameters
    ----------
    gm
        A dynamo (or make_fx) graph; nodes carry ``example_value`` / ``val``.
    min_tokens
        Regions whose input ``[B, S, H]`` has a static ``S <= min_tokens`` are left alone (decode
        steps, short prompts); a symbolic ``S`` is always rewritten (the op runs the region once
        when ``S`` fits one chunk).
    chunk_tokens
        Tokens per chunk; ``min_tokens`` when not given.

    Returns
    -------
    PassReport
        One site per region found, latest first; ``short`` and ``skipped`` ones say why. A region
        traced with gradients on is skipped: the op has no backward (ShadowKV runs under no_grad).
    """
    chunk_tokens = min_tokens if chunk_tokens is None else chunk_tokens
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    graph, report = gm.graph, PassReport(subject="token-wise regions", done="chunked")
    order = {n: i for i, n in enumerate(graph.nodes)}
    # latest first: an MLP's down projection claims its region before a linear inside it could
    candidates = [n for n in reversed(graph.nodes) if _is_linear(gm, n)]
    erased: set[fx.Node] = set()
    for down in candidates:
        if down in erased:
            continue
        region = find_region(gm, down, order)
        if region is None:
            continue
        skip = _skip_reason(region, min_tokens)
        if skip is not None:
            report.sites.append(SiteReport(region.name, *skip))
            continue
        name = region.name
        op = rewrite_region(gm, region, chunk_tokens)
        order[op] = order[down]
        erased.update(region.nodes)
        report.sites.append(SiteReport(name, "rewritten"))
    if report.rewritten:
        graph.lint()
        gm.recompile()
    log.info("token-chunk pass: %s", report)
    return report


def chunk_prefill_mlps(gm: fx.GraphModule, config, attention_sites: int) -> PassReport | None:
    """The pass as the ShadowKV backends run it: ``config.prefill_mlp_chunk`` tokens at a time,
    when ShadowKV is enabled. A graph with rewritten attention (``attention_sites``) but no
    token-wise region is logged: its model's long prefills hold the whole prompt's MLP
    intermediates, which ``preflight.work_reserve`` (sized for one chunk of them) does not count."""
    if not config.enabled or config.prefill_mlp_chunk is None:
        return None
    report = chunk_token_regions(gm, min_tokens=config.prefill_mlp_chunk)
    if attention_sites and not report.matched:
        log.warning("token-chunk pass: no MLP found in this graph; a long prefill keeps its whole MLP "
                    "intermediates, beyond what preflight reserves for them")
    return report

