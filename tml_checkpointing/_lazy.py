"""Names of a package imported on first use (PEP 562): importing the package stays cheap.

Why: the writer process imports ``tml_checkpointing.writing.writer_main``, which runs every
parent package's ``__init__`` first; with eager re-exports that meant importing torch before
its first write. Each package lists which submodule holds which public name; this module makes
the ``__getattr__`` and ``__dir__`` that import it on first access.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_names(
    package: str, namespace: dict[str, Any], module_of: Mapping[str, str], public: list[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` (``namespace`` is its ``globals()``;
    ``module_of`` maps each lazy name to its submodule, relative to the package)."""

    def get(name: str) -> Any:
        module = module_of.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        namespace[name] = value  # kept: the next lookup does not come here
        return value

    def names() -> list[str]:
        return sorted({*namespace, *public})

    return get, names
