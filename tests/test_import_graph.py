"""The package's layers, checked on the source: commands on top, the library below, no import cycle.

The graph is built by parsing every module of ``rltrain`` with ``ast`` (nothing is imported): an edge for every
``import`` / ``from ... import`` of an ``rltrain`` module, at module level or inside a function, relative imports
resolved, ``from pkg import name`` to ``pkg.name`` where that is a module and to ``pkg`` otherwise. Importing a module
also runs its packages' ``__init__``, so an edge to ``a.b.c`` comes with edges to ``a.b`` and ``a`` (except to the
importer's own packages, which are initialised before it runs). The one exception is the body of an
``if __name__ == "__main__":`` block: it runs only when the file is the program (``python -m rltrain.train``), as the
module ``__main__``, never when the module is imported, so it is not an edge of the module.

Layers: ``rltrain.cli`` (the dispatcher) and ``rltrain.commands`` (one module per command) sit on top; every other
module is library and imports neither. The benchmark harnesses (``rltrain.bench``) sit beside the library: only the
commands import them.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "rltrain"
COMMAND_LAYER = ("rltrain.cli", "rltrain.commands")
BENCH = "rltrain.bench"


def _within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts))]


def _is_main_guard(node: ast.AST) -> bool:
    """``if __name__ == "__main__":``"""
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare) or len(node.test.ops) != 1:
        return False
    sides = [node.test.left, *node.test.comparators]
    return (isinstance(node.test.ops[0], ast.Eq) and any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides)
            and any(isinstance(s, ast.Constant) and s.value == "__main__" for s in sides))


def _import_nodes(tree: ast.AST):
    """Every Import / ImportFrom node, at any depth, except inside ``if __name__ == "__main__":`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if _is_main_guard(node):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def modules(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def import_graph(package_dir: Path) -> dict[str, dict[str, int]]:
    """module -> {imported module: line of the first import}, within the package."""
    mods = modules(package_dir)

    def known(name: str) -> str | None:  # the module an imported name lives in (its longest prefix that is one)
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {m: {} for m in mods}
    for module, path in mods.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        own = {module, *_ancestors(module)}
        for node in _import_nodes(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [known(a.name) for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                targets = [known(f"{base}.{a.name}") if f"{base}.{a.name}" in mods else known(base)
                           for a in node.names]
            for target in targets:
                if target is None:
                    continue
                for t in (target, *_ancestors(target)):
                    if t not in own:
                        graph[module].setdefault(t, node.lineno)
    return graph


def components(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of 2+ modules (sorted): the modules that lie on a cycle, together."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan; the package is small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(sorted(c) for c in components if len(c) > 1)


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One shortest cycle (a list of modules, the first repeated at the end) per component, from its first module."""
    out = []
    for component in components(graph):
        members, start = set(component), component[0]
        parents, frontier = {start: None}, [start]
        while start not in [w for v in frontier for w in graph[v]]:  # breadth first, back to start
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w in members and w not in parents:
                        parents[w] = v
                        nxt.append(w)
            frontier = nxt
        last = next(v for v in frontier if start in graph[v])
        path = [last]
        while parents[path[-1]] is not None:
            path.append(parents[path[-1]])
        out.append([*reversed(path), start])
    return out


def _describe(component: list[str], cycle: list[str], graph) -> str:
    edges = " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"
    return f"{len(component)} modules on cycles: {', '.join(component)}\n  e.g. {edges}"


def test_the_package_has_no_import_cycle():
    graph = import_graph(PACKAGE_DIR)
    found = components(graph)
    assert not found, "import cycles (an edge names the importing module and the line):\n" + "\n".join(
        _describe(c, cycle, graph) for c, cycle in zip(found, cycles(graph)))


def test_the_library_never_imports_the_command_layer():
    graph = import_graph(PACKAGE_DIR)
    bad = [f"{m} imports {t} (line {line})" for m, targets in graph.items() if not _within(m, COMMAND_LAYER)
           for t, line in targets.items() if _within(t, COMMAND_LAYER)]
    assert not bad, "library modules importing rltrain.cli / rltrain.commands:\n" + "\n".join(bad)


def test_only_the_commands_import_the_benchmarks():
    graph = import_graph(PACKAGE_DIR)
    bad = [f"{m} imports {t} (line {line})" for m, targets in graph.items()
           if not _within(m, (*COMMAND_LAYER, BENCH)) for t, line in targets.items() if _within(t, (BENCH,))]
    assert not bad, "library modules importing the benchmark harnesses:\n" + "\n".join(bad)


def test_the_graph_sees_every_kind_of_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .b import B\n")
    (pkg / "a.py").write_text("import os\n\ndef f():\n    from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("B = 1\n\nclass C:\n    def g(self):\n        from .. import c\n")
    (pkg / "c.py").write_text("import pkg.a as a\n")
    (pkg / "d.py").write_text("from pkg import c\nif __name__ == '__main__':\n    from pkg import a\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.sub.b": 4, "pkg.sub": 4}  # function level; the package's __init__ runs too
    assert graph["pkg.sub.b"] == {"pkg.c": 5}  # relative, two levels; its own package is no edge
    assert graph["pkg.sub"] == {"pkg.sub.b": 1}
    assert graph["pkg.c"] == {"pkg.a": 1}
    assert graph["pkg.d"] == {"pkg.c": 1}  # the __main__ block is not an edge
    assert components(graph) == [["pkg.a", "pkg.c", "pkg.sub", "pkg.sub.b"]]
    assert cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]


def test_every_command_of_the_dispatcher_exists():
    """``rltrain.cli`` imports its commands by name (so that the edges above do not show them): each is a module of
    rltrain/commands/ with that function."""
    from rltrain.cli import COMMANDS

    for (command, sub), (module, function) in COMMANDS.items():
        path = PACKAGE_DIR / "commands" / f"{module}.py"
        assert path.is_file(), f"rltrain {command} {sub or ''}: no {path}"
        defined = {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}
        assert function in defined, f"rltrain {command} {sub or ''}: {path} defines no {function}()"
