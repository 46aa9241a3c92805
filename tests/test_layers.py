"""The layers of ovsfs, checked from the source (issue 10, item 8; DESIGN.md "Imports flow
one way"): cli -> daemon -> doors -> engine (+ dtl, cluster) -> backend -> shared helpers.

Every import counts: module level, inside functions, and under TYPE_CHECKING (a type-only
import is still a dependency a reader must follow, and the next refactor turns it into a
real one). Two rules:
- no import circle between ovsfs modules (within a layer too);
- no module imports a module of a higher layer.

It reads the files with `ast` and imports nothing, so it runs first (tests/conftest.py
orders the suite bottom-up, this file before every layer) and fails in a second.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "ovsfs"

# Higher number = higher layer. A module may import its own layer or lower ones.
# The first matching prefix wins (longest prefixes first).
LAYERS: list[tuple[str, int, str]] = [
    ("ovsfs.cli", 70, "cli"),
    ("ovsfs.daemon", 60, "daemon"),
    ("ovsfs.preflight", 60, "daemon"),
    # This node as a member of a cluster: beside the daemon, above the doors' API.
    ("ovsfs.member", 60, "daemon"),
    # Door servers, and the management API the daemon serves beside them.
    ("ovsfs.nbd", 50, "doors"),
    ("ovsfs.fuse", 50, "doors"),
    ("ovsfs.shm", 50, "doors"),
    ("ovsfs.iscsi", 50, "doors"),
    ("ovsfs.mgmt", 50, "doors"),
    # The one async adapter every door server uses, between them and the engine.
    ("ovsfs.doors", 40, "door adapter"),
    ("ovsfs.engine", 30, "engine"),
    ("ovsfs.dtl", 30, "engine"),
    ("ovsfs.cluster", 30, "engine"),
    ("ovsfs.backend", 20, "backend"),
    # The client library (front end of the shm door, openvstorage: URIs): for programs
    # that are not the daemon; only the shared helpers below it.
    ("ovsfs.client", 15, "client library"),
    ("ovsfs.vhost", 10, "shared helpers"),
    ("ovsfs.config", 10, "shared helpers"),
    ("ovsfs.errors", 10, "shared helpers"),
    ("ovsfs.fsutil", 10, "shared helpers"),
]


def module_files() -> dict[str, Path]:
    """Every module of the package: dotted name -> file (a package is its __init__.py)."""
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def layer_of(module: str) -> tuple[int, str]:
    for prefix, rank, name in sorted(LAYERS, key=lambda item: -len(item[0])):
        if module == prefix or module.startswith(prefix + "."):
            return rank, name
    if module == PACKAGE:
        return 0, "package"
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")


def imports_of(module: str, path: Path, modules: set[str]) -> dict[str, int]:
    """The ovsfs modules `module` imports (every import statement in the file) -> a line."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    here = module if is_pkg else module.rpartition(".")[0]
    found: dict[str, int] = {}

    def add(name: str, line: int) -> None:
        # The deepest ovsfs module the name denotes (`ovsfs.engine.tlog.SIZE` -> ovsfs.engine.tlog).
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.setdefault(name, line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == PACKAGE or a.name.startswith(PACKAGE + "."):
                    add(a.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = here.split(".")
                base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if not (base == PACKAGE or base.startswith(PACKAGE + ".")):
                continue
            for a in node.names:
                # `from ovsfs.engine import tlog` imports the module ovsfs.engine.tlog.
                sub = f"{base}.{a.name}"
                add(sub if sub in modules else base, node.lineno)
    return found


def import_graph() -> dict[str, dict[str, int]]:
    files = module_files()
    names = set(files)
    return {m: imports_of(m, p, names) for m, p in files.items()}


def circles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        comp.append(m)
                        if m == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return sorted(out)


def test_no_import_circles() -> None:
    graph = import_graph()
    found = circles(graph)
    lines = []
    for comp in found:
        edges = [f"{a} -> {b} (line {graph[a][b]})" for a in comp for b in sorted(graph[a]) if b in comp]
        lines.append(" <-> ".join(comp) + "\n      " + "\n      ".join(edges))
    assert not found, "import circles (TYPE_CHECKING and function-level imports count):\n  " + "\n  ".join(lines)


def test_no_upward_imports() -> None:
    graph = import_graph()
    bad = []
    for mod, deps in sorted(graph.items()):
        rank, layer = layer_of(mod)
        for dep, line in sorted(deps.items()):
            dep_rank, dep_layer = layer_of(dep)
            if dep_rank > rank:
                bad.append(f"{mod} ({layer}) imports {dep} ({dep_layer}) at line {line}")
    assert not bad, ("imports against the layering (cli -> daemon -> doors -> engine -> backend -> helpers):\n  "
                     + "\n  ".join(bad))


@pytest.mark.parametrize("source,expect", [
    # The checker itself: a circle through a TYPE_CHECKING import and a function-level one.
    ({"ovsfs.a": {"ovsfs.b": 1}, "ovsfs.b": {"ovsfs.c": 2}, "ovsfs.c": {"ovsfs.a": 3}, "ovsfs.d": {"ovsfs.a": 4}},
     [["ovsfs.a", "ovsfs.b", "ovsfs.c"]]),
    ({"ovsfs.a": {"ovsfs.b": 1}, "ovsfs.b": {}}, []),
])
def test_circle_finder(source: dict[str, dict[str, int]], expect: list[list[str]]) -> None:
    assert circles(source) == expect


def test_imports_are_read_from_every_kind_of_statement(tmp_path: Path) -> None:
    f = tmp_path / "mod.py"
    f.write_text("from typing import TYPE_CHECKING\n"
                 "if TYPE_CHECKING:\n    from ovsfs.engine.volume import Volume\n"
                 "def f():\n    from ovsfs.engine import tlog\n    import ovsfs.errors\n"
                 "from . import names\n")
    mods = {"ovsfs.engine.volume", "ovsfs.engine.tlog", "ovsfs.errors", "ovsfs.engine.names", "ovsfs.engine"}
    got = imports_of("ovsfs.engine.log", f, mods)
    assert set(got) == {"ovsfs.engine.volume", "ovsfs.engine.tlog", "ovsfs.errors", "ovsfs.engine.names"}
