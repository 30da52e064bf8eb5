"""One owner per concept in the library: each is spelled in one module, and stays there.

Read with :mod:`ast` from the source (string constants and calls, docstrings left out), so a
second spelling fails here before it drifts from the first.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import get_args

import pytest

from tml_checkpointing.errors import (
    REMEDIES,
    CorruptCheckpointError,
    CorruptionKind,
    corrupt_checkpoint,
)

LIBRARY = Path(__file__).resolve().parent.parent / "tml_checkpointing"


def _modules() -> dict[str, ast.Module]:
    return {
        str(path.relative_to(LIBRARY)): ast.parse(path.read_text())
        for path in sorted(LIBRARY.rglob("*.py"))
    }


def _docstrings(tree: ast.Module) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def _strings(tree: ast.Module) -> list[str]:
    skip = _docstrings(tree)
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
    ]


def _spelled_in(predicate: object) -> list[str]:
    assert callable(predicate)
    return sorted(
        name for name, tree in _modules().items() if any(predicate(text) for text in _strings(tree))
    )


def test_corrupt_checkpoint_errors_are_built_by_the_factory() -> None:
    builders = sorted(
        name
        for name, tree in _modules().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "CorruptCheckpointError"
    )
    assert builders == ["errors.py"], builders


@pytest.mark.parametrize("kind", get_args(CorruptionKind))
def test_each_kind_of_corruption_has_its_remedy(kind: CorruptionKind) -> None:
    error = corrupt_checkpoint("/run/3", "0/model", "checksum mismatch", kind=kind)
    assert isinstance(error, CorruptCheckpointError)
    assert str(error) == (
        f"checkpoint /run/3 is corrupt: 0/model: checksum mismatch. {REMEDIES[kind]}."
    )
    assert (error.checkpoint, error.path, error.problem) == (
        "/run/3",
        "0/model",
        "checksum mismatch",
    )


def test_data_file_names_are_spelled_in_layout_only() -> None:
    assert _spelled_in(lambda s: s.startswith(("batched", "delta/"))) == ["format/layout.py"]


def test_object_store_protocols_are_listed_once() -> None:
    assert _spelled_in(lambda s: s in {"abfss", "adl", "gcs", "s3a"}) == ["storage/filesystem.py"]
