"""The ShadowKV pass: swap every attention site of a graph for ``torch.ops.shadowkv.attention``."""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx

from shadowkv_fx.passes.attention_sites import AttentionSite, find_attention_sites

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteReport:
    index: int
    name: str
    status: str  # "rewritten" | "skipped" | "disabled"
    reason: str = ""


@dataclass
class PassReport:
    """What the pass did to one graph: one entry per attention site, in execution order."""

    sites: list[SiteReport] = field(default_factory=list)

    @property
    def matched(self) -> int:
        return len(self.sites)

    @property
    def rewritten(self) -> int:
        return sum(s.status == "rewritten" for s in self.sites)

    @property
    def skipped(self) -> list[SiteReport]:
        return [s for s in self.sites if s.status == "skipped"]

    def __str__(self) -> str:
        lines = [f"{self.matched} attention sites, {self.rewritten} rewritten"]
        lines += [f"  site {s.index} ({s.name}): {s.status} {s.reason}".rstrip() for s in self.sites if s.status != "rewritten"]
        return "\n".join(lines)


def pass_uuid(folder: Path = Path(__file__).parent) -> str:
    """Changes whenever the pass's source does, so inductor's cache keys on it."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def extract_rope(site: AttentionSite, owner: torch.nn.Module) -> fx.GraphModule:
    """Cut the key-RoPE subgraph out as ``rope(k_pre, *rope_inputs) -> k_post``."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {site.k_pre: graph.placeholder("k_pre")}
    for i, node in enumerate(site.rope_inputs):
        env[node] = graph.placeholder(f"rope_input_{i}")
    for node in site.rope_region:
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[site.k])
    return fx.GraphModule(owner, graph, class_name="KeyRope")


def _erase_dead(graph: fx.Graph, candidates: list[fx.Node]) -> None:
    """Erase the replaced site and whatever fed only it (masks, repeat_kv, key RoPE)."""
    todo, erased = list(candidates), set()
    while todo:
        node = todo.pop()
        if node in erased or node.users or node.op in ("placeholder", "output"):
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        erased.add(node)
        todo.extend(inputs)


def shadowkv_pass(gm: fx.GraphModule, enabled: bool = True) -> PassReport:
    """Rewrite ``gm`` in place. With ``enabled=False`` only report the sites."""
    from shadowkv_fx import ops  # registers torch.ops.shadowkv

    report = PassReport()
    sites = find_attention_sites(gm.graph)
    layer = 0
    for index, site in enumerate(sites):
        if site.skip_reason:
            report.sites.append(SiteReport(index, site.name, "skipped", site.skip_reason))
            continue
        if not enabled:
            report.sites.append(SiteReport(index, site.name, "disabled"))
            continue
        rope_key = ops.register_rope(extract_rope(site, gm))
        with gm.graph.inserting_before(site.output):
            new = gm.graph.call_function(
                torch.ops.shadowkv.attention.default,
                (site.q, site.k_pre, site.v, list(site.rope_inputs), layer, rope_key, site.scale),
            )
        new.meta.update(site.output.meta)
        site.output.replace_all_uses_with(new)
        _erase_dead(gm.graph, site.removed + site.rope_region)
        report.sites.append(SiteReport(index, site.name, "rewritten"))
        layer += 1
    if report.rewritten:
        gm.graph.lint()
        gm.recompile()
    log.info("shadowkv pass: %s", report)
    return report
