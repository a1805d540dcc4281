#!/usr/bin/env python3
"""The import graph of the package: edges, cycles and module line counts.

Reads every module of ``shadowkv_fx/`` and of the folders installed under it (``passes/`` as
``shadowkv_fx.passes``, ``kernels/`` as ``shadowkv_fx.kernels``, pyproject's package-dir mapping)
with ``ast``, so nothing is imported. Imports inside functions count like those at the top: a
lazy import only hides a cycle from the interpreter, not from the reader. An edge goes to the
module an import names (``from shadowkv_fx import fold`` -> ``shadowkv_fx.fold``), not to the
packages above it. A cycle is a strongly connected component of two or more modules (or a module
importing itself).

Usage: python scripts/import_graph.py [--quiet]   exits 1 if any cycle exists.
"""
from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "shadowkv_fx"
# folder -> the package name it is installed as (pyproject.toml [tool.setuptools.package-dir])
ROOTS = {"shadowkv_fx": "shadowkv_fx", "passes": "shadowkv_fx.passes", "kernels": "shadowkv_fx.kernels"}


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    lazy: bool  # imported inside a function or class body, not at module level


@dataclass
class ImportGraph:
    modules: dict[str, Path]  # module name -> file
    edges: list[Edge]
    lines: dict[str, int]  # module name -> line count

    def cycles(self) -> list[list[str]]:
        """Strongly connected components with a cycle, each sorted, largest first."""
        return find_cycles(self.modules, [(e.source, e.target) for e in self.edges])


def module_files(repo: Path = REPO, roots: dict[str, str] = ROOTS) -> dict[str, Path]:
    """Every module under ``roots`` (folder -> package name), by dotted name."""
    found = {}
    for folder, package in roots.items():
        base = repo / folder
        for path in sorted(base.rglob("*.py")):
            relative = path.relative_to(base).with_suffix("")
            parts = [] if relative.parts == ("__init__",) else list(relative.parts)
            if parts and parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """Dotted names an import statement brings in (before resolving which of them are modules)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    return [f"{prefix}.{alias.name}" for alias in node.names] + [prefix]


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` is or lies in."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def module_edges(module: str, path: Path, modules: dict[str, Path]) -> list[Edge]:
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    lazy_nodes = set()
    for scope in ast.walk(tree):
        if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            lazy_nodes.update(id(n) for n in ast.walk(scope) if n is not scope)
    edges = {}
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        names = _imported(node, module, is_package)
        if isinstance(node, ast.ImportFrom):
            # ``from pkg import a, b``: a and b when they are modules, else pkg itself
            targets = {t for t in (_exact(n, modules) for n in names[:-1]) if t is not None}
            if len(targets) < len(names) - 1:
                targets.add(_resolve(names[-1], modules))
        else:
            targets = {_resolve(n, modules) for n in names}
        lazy = id(node) in lazy_nodes
        for target in targets - {None}:
            # an edge is lazy only if every import behind it is
            edges[target] = Edge(module, target, lazy and (target not in edges or edges[target].lazy))
    return list(edges.values())


def _exact(name: str, modules: dict[str, Path]) -> str | None:
    return name if name in modules else None


def find_cycles(nodes, edges: list[tuple[str, str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, keeping those that hold a cycle."""
    graph: dict[str, list[str]] = {n: [] for n in nodes}
    for source, target in edges:
        graph.setdefault(source, []).append(target)
        graph.setdefault(target, [])
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(root: str) -> None:
        # iterative: a deep import chain must not hit Python's recursion limit
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph[node]:
                    found.append(sorted(component))

    for node in list(graph):
        if node not in index:
            visit(node)
    return sorted(found, key=lambda c: (-len(c), c))


def import_graph(repo: Path = REPO, roots: dict[str, str] = ROOTS) -> ImportGraph:
    modules = module_files(repo, roots)
    # a package's own name in its imports (``from pkg import name``, name not a module) is no edge
    edges = [e for name, path in modules.items() for e in module_edges(name, path, modules) if e.target != name]
    lines = {name: len(path.read_text().splitlines()) for name, path in modules.items()}
    return ImportGraph(modules, sorted(edges, key=lambda e: (e.source, e.target)), lines)


def relative_path(graph: ImportGraph, module: str, repo: Path = REPO) -> str:
    return graph.modules[module].relative_to(repo).as_posix()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quiet", action="store_true", help="print only the cycles")
    args = parser.parse_args(argv)
    graph = import_graph()
    cycles = graph.cycles()
    if not args.quiet:
        print(f"edges ({len(graph.edges)}; 'lazy' = imported inside a function):")
        for edge in graph.edges:
            print(f"  {edge.source} -> {edge.target}{'  (lazy)' if edge.lazy else ''}")
        print("module lines:")
        for name, count in sorted(graph.lines.items(), key=lambda item: (-item[1], item[0])):
            print(f"  {count:5d}  {relative_path(graph, name)}")
    print(f"cycles: {len(cycles)}")
    for cycle in cycles:
        print("  " + " <-> ".join(cycle))
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main())
