"""The ``tml checkpoints ...`` command line: one module per command group.

- ``app``: the parser and ``main`` (exit codes from the kind of error).
- ``common``: exit codes, argument types, output (``--json``), messages.
- ``listing``: ``list``.  ``inspection``: ``inspect``.  ``verify``: ``verify``.
- ``maintenance``: ``prune``, ``materialize``, ``clean-incomplete``.

``main`` is the console entry point (``tml = "tml_checkpointing.cli:main"``);
``python -m tml_checkpointing.cli`` runs it too.
"""

from .app import main
from .common import parse_duration, positive_int

__all__ = ["main", "parse_duration", "positive_int"]
