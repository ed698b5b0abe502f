"""The package layering, read from the source with ast: no import cycle anywhere in webproxy/,
cache/ or tunnel/ (type-only imports included), cache and tunnel never import webproxy, and no
project import hides inside a function (the usual way to dodge a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("webproxy", "cache", "tunnel")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported project module, line, at module level) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(node) for node in tree.body}
    for node in tree.body:  # `if TYPE_CHECKING:` blocks count as module level (and as edges)
        if isinstance(node, ast.If):
            top_level.update(id(n) for n in node.body)
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            # the longest known module the name refers to
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name.split(".")[0] in PACKAGES:
                out.append((name, node.lineno, id(node) in top_level))
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for target, _, _ in _imports(path, known):
            if target != mod and target not in PACKAGES:  # a package's __init__ re-exports are leaves here
                graph[mod].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_in_any_package():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_cache_and_tunnel_never_import_webproxy():
    mods = _modules()
    offenders = [f"{path.relative_to(ROOT)}:{line} imports {target}"
                 for mod, path in mods.items() if mod.split(".")[0] in ("cache", "tunnel")
                 for target, line, _ in _imports(path, set(mods)) if target.split(".")[0] == "webproxy"]
    assert offenders == []


def test_no_project_import_inside_a_function():
    mods = _modules()
    offenders = [f"{path.relative_to(ROOT)}:{line} imports {target}"
                 for mod, path in mods.items()
                 for target, line, top in _imports(path, set(mods)) if not top]
    assert offenders == []
