"""The parameter table in docs/training.md is the one generated from the parameter models."""

from __future__ import annotations

from scripts.parameter_table import DOCS, documented, render


def test_the_docs_parameter_table_is_generated_from_the_models() -> None:
    assert documented() == render(), (
        f"{DOCS} is out of date: run .venv/bin/python scripts/parameter_table.py"
    )
