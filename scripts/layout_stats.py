"""The library's shape in numbers, for a git revision or the working tree (docs/layout.md).

    python scripts/layout_stats.py            # the working tree
    python scripts/layout_stats.py HEAD       # a revision: files read with ``git show``

Counts, from the source alone (``ast``; nothing is imported): modules (every ``.py`` file of
``tml_checkpointing/``), internal imports (one per importing module and imported library
module, imports inside functions included), import levels (the longest chain of internal
imports, in modules: a module importing no sibling is level 1), import cycles (groups of
modules that import each other), the largest modules by lines and the largest classes by
lines and methods.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "tml_checkpointing"
ROOT = Path(__file__).resolve().parent.parent


def sources(revision: str | None) -> dict[str, str]:
    """``{path relative to the repository: text}`` of every library module."""
    if revision is None:
        return {
            str(p.relative_to(ROOT)): p.read_text() for p in sorted((ROOT / PACKAGE).rglob("*.py"))
        }
    listing = subprocess.run(
        ["git", "ls-tree", "-r", "--name-only", revision, PACKAGE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return {
        path: subprocess.run(
            ["git", "show", f"{revision}:{path}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for path in listing
        if path.endswith(".py")
    }


def module_of(path: str) -> str:
    parts = path.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: str, text: str, known: set[str]) -> set[str]:
    """The library modules ``path`` imports (a name imported from a package that is itself a
    module counts as that module)."""
    name = module_of(path)
    package = name.split(".") if path.endswith("__init__.py") else name.split(".")[:-1]
    found: set[str] = set()

    def add(dotted: str) -> None:
        while dotted not in known and "." in dotted:
            dotted = dotted.rsplit(".", 1)[0]
        if dotted in known and dotted != name:
            found.add(dotted)

    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            if base.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in known else base)
    return found


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components, each a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            components.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for node in sorted(edges):
        if node not in index:
            visit(node)
    return components


def levels(edges: dict[str, set[str]]) -> int:
    """The longest chain of imports, in modules (a cycle counts once, as one group)."""
    components = strongly_connected(edges)
    group = {node: i for i, component in enumerate(components) for node in component}
    memo: dict[int, int] = {}

    def depth(g: int) -> int:
        if g not in memo:
            below = {group[t] for n in components[g] for t in edges[n]} - {g}
            memo[g] = len(components[g]) + max((depth(b) for b in below), default=0)
        return memo[g]

    return max((depth(g) for g in range(len(components))), default=0)


@dataclass
class ClassSize:
    name: str
    lines: int
    methods: int


def classes(path: str, text: str) -> list[ClassSize]:
    found = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            methods = sum(isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) for n in node.body)
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            found.append(ClassSize(f"{module_of(path)}.{node.name}", lines, methods))
    return found


def main(argv: list[str]) -> None:
    revision = argv[1] if len(argv) > 1 else None
    texts = sources(revision)
    known = {module_of(p) for p in texts}
    edges = {module_of(p): imports(p, t, known) for p, t in texts.items()}
    cycles = [c for c in strongly_connected(edges) if len(c) > 1]
    print(f"revision: {revision or 'working tree'}")
    print(f"modules: {len(texts)} (.py files under {PACKAGE}/)")
    print(f"internal imports: {sum(len(v) for v in edges.values())}")
    print(f"import levels: {levels(edges)}")
    print(f"import cycles: {len(cycles)} {' '.join('<->'.join(c) for c in cycles)}")
    sizes = sorted(((t.count(chr(10)), p) for p, t in texts.items()), reverse=True)[:8]
    print("largest modules: " + ", ".join(f"{p.removeprefix(PACKAGE + '/')} {n}" for n, p in sizes))
    found = [c for p, t in texts.items() for c in classes(p, t)]
    top = sorted(found, key=lambda c: c.lines, reverse=True)[:5]
    print(
        "largest classes: "
        + ", ".join(
            f"{c.name.removeprefix(PACKAGE + '.')} {c.lines} lines/{c.methods}" for c in top
        )
    )


if __name__ == "__main__":
    main(sys.argv)
