"""One owner for each layer's compressed state (issue #30): ``LayerState`` declares every field in
``__init__``, each with its meaning, and no other module rebinds one; its modules sit in no
import cycle and stay small. Static checks over the sources: no model runs here."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OWNER = ROOT / "shadowkv_fx" / "layer_state.py"
# every module that may hold a LayerState (tests poke fields on purpose and are left out)
SCANNED = [*(ROOT / "shadowkv_fx").rglob("*.py"), *(ROOT / "passes").rglob("*.py"), *(ROOT / "kernels").rglob("*.py"),
           *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "examples").glob("*.py"), *(ROOT / "scripts").glob("*.py")]
STATE_NAMES = {"state", "s"}


def _is_state(node: ast.expr) -> bool:
    """``state``, ``s``, or anything's ``.state`` (``layer.state``, ``cache.layers[i].state``)."""
    return (isinstance(node, ast.Name) and node.id in STATE_NAMES) or (isinstance(node, ast.Attribute)
                                                                          and node.attr == "state")


def _targets(node: ast.AST) -> list[ast.expr]:
    if isinstance(node, ast.Assign):
        found = list(node.targets)
    elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
        found = [node.target]
    elif isinstance(node, ast.Delete):
        found = list(node.targets)
    else:
        return []
    flat = []
    while found:
        t = found.pop()
        if isinstance(t, (ast.Tuple, ast.List)):
            found.extend(t.elts)
        else:
            flat.append(t.value if isinstance(t, ast.Starred) else t)
    return flat


def state_rebinds(source: str) -> list[str]:
    """``line: field`` of each ``state.field = ...`` (or ``+=``, ``del``, ``setattr(state, ...)``)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        for t in _targets(node):
            if isinstance(t, ast.Attribute) and _is_state(t.value):
                found.append(f"{node.lineno}: {t.attr}")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr")
                and node.args and _is_state(node.args[0])):
            found.append(f"{node.lineno}: {ast.unparse(node.args[1]) if len(node.args) > 1 else '?'}")
    return found


def test_the_scan_finds_every_spelling_of_a_rebind():
    source = """
state.tail_len += 1
s.chunks, s.fit_err = a, b
layer.state.writes_tables = False
cache.layers[0].state.u = u
setattr(state, "k_buf", new)
state.u[0, :3] = rows          # in place: allowed
self.state = LayerState(config)  # the holder's own attribute: allowed
"""
    assert sorted(f.split(": ")[1] for f in state_rebinds(source)) == sorted(
        ["tail_len", "chunks", "fit_err", "writes_tables", "u", "'k_buf'"])


def test_only_layer_state_rebinds_its_fields():
    offenders = {str(path.relative_to(ROOT)): found for path in SCANNED if path.resolve() != OWNER
                 and (found := state_rebinds(path.read_text()))}
    assert not offenders, f"only shadowkv_fx/layer_state.py may rebind LayerState fields; call a method: {offenders}"


def _layer_state_class() -> ast.ClassDef:
    tree = ast.parse(OWNER.read_text())
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "LayerState")


def _self_fields(method: ast.FunctionDef) -> dict[str, int]:
    fields = {}
    for node in ast.walk(method):
        for t in _targets(node):
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                fields.setdefault(t.attr, node.lineno)
    return fields


def test_every_field_is_declared_in_init_with_its_meaning():
    methods = [n for n in _layer_state_class().body if isinstance(n, ast.FunctionDef)]
    init = next(m for m in methods if m.name == "__init__")
    declared = _self_fields(init)
    lines = OWNER.read_text().splitlines()
    undocumented = [name for name, line in declared.items()
                    if name != "config" and "#" not in lines[line - 1] and not lines[line - 2].strip().startswith("#")]
    assert not undocumented, f"say what these hold (shape, meaning) in a comment: {undocumented}"
    for method in methods:
        stray = set(_self_fields(method)) - set(declared)
        assert not stray, f"LayerState.{method.name} sets fields __init__ does not declare: {sorted(stray)}"
    assert len(declared) > 40


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


STATE_MODULES = {f"shadowkv_fx.{m}" for m in ("layer_state", "decode_step", "fold", "cache", "preflight",
                                              "prompt_layout", "memory_report", "prefill_attention", "rope_tables",
                                              "pinned", "host_memory", "host_copies")}


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


def test_the_state_modules_stay_small():
    paths = _module_names()
    long = {name: n for name in STATE_MODULES if (n := len(paths[name].read_text().splitlines())) > 400}
    assert not long, f"split these by purpose (house style: <= 400 lines): {long}"
