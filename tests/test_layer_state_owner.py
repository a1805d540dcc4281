"""The modules of each layer's compressed state sit in no import cycle (issue #30; lazy imports
inside functions count). Static checks over the sources: no model runs here."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """Package modules ``name`` imports anywhere in it (inside functions too)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                found |= {full} if full in modules else {base} & modules
    return found - {name}


def _module_names() -> dict[str, Path]:
    names = {}
    for folder, package in ((ROOT / "shadowkv_fx", "shadowkv_fx"), (ROOT / "passes", "shadowkv_fx.passes"),
                            (ROOT / "kernels", "shadowkv_fx.kernels")):
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            if folder.name == "shadowkv_fx" and parts and parts[0] in ("passes", "kernels"):
                continue  # a checkout's links to the mapped folders
            names[".".join([package, *parts])] = path
    return names


STATE_MODULES = {f"shadowkv_fx.{m}" for m in ("layer_state", "fold", "cache", "preflight", "prompt_layout",
                                              "rope_tables", "pinned", "host_memory", "host_copies")}


def test_the_state_modules_are_in_no_import_cycle():
    paths = _module_names()
    assert STATE_MODULES <= set(paths)
    graph = {name: _imports(path, name, set(paths)) for name, path in paths.items()}
    for start in STATE_MODULES:
        # depth-first from each module: a path back to it is a cycle
        stack, seen = [(start, [start])], set()
        while stack:
            name, route = stack.pop()
            for dep in graph[name]:
                assert dep != start, f"import cycle: {' -> '.join(route + [dep])}"
                if dep not in seen:
                    seen.add(dep)
                    stack.append((dep, route + [dep]))
