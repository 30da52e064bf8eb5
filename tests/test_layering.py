"""The library's import graph, read statically: no cycles, no Prefect, rooms stacked in order.

Read with :mod:`ast` (nothing is imported), every import counted, including those inside
functions and under ``TYPE_CHECKING``: an import deferred into a function is still a cycle a
reader has to untangle. Modules are named without the ``tml_checkpointing.`` prefix, and a
package by its ``__init__`` module (``cli`` for ``tml_checkpointing/cli/__init__.py``).
"""

from __future__ import annotations

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parent.parent / "tml_checkpointing"
PACKAGE = "tml_checkpointing"

# The rooms from the bottom up: a module may import from its own room and the rooms below it.
# The top-level modules (_version, _lazy, errors, events) are the floor; snapshot and the
# package's own __init__ sit above every room but cli.
ORDER = [
    "_version",
    "_lazy",
    "errors",
    "events",
    "format",
    "storage",
    "catalog",
    "reading",
    "writing",
    "lifecycle",
]
ABOVE = ["snapshot", "__init__", "cli"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(LIBRARY).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(LIBRARY.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> tuple[set[str], set[str]]:
    """(library modules ``name`` imports, top-level third-party packages it imports)."""
    is_package = path.name == "__init__.py"
    package = name.split(".") if is_package and name != "__init__" else name.split(".")[:-1]
    internal: set[str] = set()
    external: set[str] = set()

    def add(dotted: str) -> None:
        if dotted == PACKAGE:
            internal.add("__init__")
        elif dotted.startswith(PACKAGE + "."):
            target = dotted.removeprefix(PACKAGE + ".")
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            internal.add(target if target in known else "__init__")
        else:
            external.add(dotted.split(".")[0])

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package[: len(package) - node.level + 1] if node.level > 1 else package
                base = ".".join([PACKAGE, *anchor, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub.removeprefix(PACKAGE + ".") in known else base)
    internal.discard(name)
    return internal, external


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    found = modules()
    known = set(found)
    internal: dict[str, set[str]] = {}
    external: dict[str, set[str]] = {}
    for name, path in found.items():
        internal[name], external[name] = imports_of(name, path, known)
    return internal, external


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def room(name: str) -> str:
    return name.split(".")[0]


def test_graph_is_read() -> None:
    internal, _ = graph()
    assert internal.get("snapshot"), "the parser found no imports"
    assert "storage.filesystem" in internal


def test_no_import_cycles() -> None:
    internal, _ = graph()
    assert find_cycle(internal) is None, " -> ".join(find_cycle(internal) or [])


def test_library_never_imports_prefect() -> None:
    _, external = graph()
    offenders = sorted(name for name, packages in external.items() if "prefect" in packages)
    assert not offenders, f"the library imports Prefect in {offenders}"


def test_rooms_are_stacked() -> None:
    """A room imports only from itself and the rooms below it: the folders are the layers."""
    internal, _ = graph()
    rank = {r: i for i, r in enumerate(ORDER + ABOVE)}
    climbing = sorted(
        f"{source} -> {target}"
        for source, targets in internal.items()
        for target in targets
        if room(source) != room(target) and rank[room(target)] > rank[room(source)]
    )
    assert not climbing, "imports that climb a layer: " + ", ".join(climbing)


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
