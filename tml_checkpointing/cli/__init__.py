"""The ``tml checkpoints ...`` command line: one module per command group.

- ``app``: the parser and ``main`` (exit codes from the kind of error).
- ``common``: exit codes, argument types, output (``--json``), messages.
- ``listing``: ``list``.  ``inspection``: ``inspect``.  ``verify``: ``verify``.
- ``maintenance``: ``prune``, ``materialize``, ``clean-incomplete``.

``main`` is the console entry point (``tml = "tml_checkpointing.cli:main"``);
``python -m tml_checkpointing.cli`` runs it too. Its names are imported on first use (PEP 562),
like the package's: importing a subpackage never imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_names

if TYPE_CHECKING:
    from .app import main
    from .common import parse_duration, positive_int

__all__ = ["main", "parse_duration", "positive_int"]

_MODULE_OF = {"main": "app", "parse_duration": "common", "positive_int": "common"}


__getattr__, __dir__ = lazy_names(__name__, globals(), _MODULE_OF, __all__)
