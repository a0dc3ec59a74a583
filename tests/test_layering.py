"""The package's imports point one way: no module imports itself back through others, and the
lower packages do not reach up into the ones built on them. Read from the source (every import,
also those inside functions), so nothing is imported here."""

import ast
from pathlib import Path

import toolchain

ROOT = Path(toolchain.__file__).parent

# package -> the toolchain packages it may import (besides its own modules)
BELOW = {
    "data": {"atomic", "errors"},
    "models": {"atomic", "errors"},
    "runtime": {"atomic", "errors", "formats", "models"},
    "evaluate": {"atomic", "console", "data", "errors", "models", "runtime"},
    "train": {"atomic", "console", "data", "errors", "evaluate", "models"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = ("toolchain",) + f.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    edges = {}
    for name, f in modules.items():
        found = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("toolchain"):
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        edges[name] = {m for m in found if m in modules and m != name}
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, or None (depth-first search for a back edge)."""
    state, path = {}, []

    def visit(v):
        state[v] = "open"
        path.append(v)
        for w in sorted(edges[v]):
            if state.get(w) == "open":
                return path[path.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = "done"
        path.pop()
        return None

    for v in sorted(edges):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_no_module_imports_itself_back():
    assert _cycle(_imports(_modules())) is None


def test_lower_packages_do_not_import_the_ones_above():
    edges = _imports(_modules())
    for package, allowed in BELOW.items():
        reached = {m.split(".")[1] for name, targets in edges.items()
                   if name.split(".")[1:2] == [package] for m in targets}
        assert reached - {package} <= allowed, (package, sorted(reached - {package} - allowed))


def test_the_cycle_search_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
