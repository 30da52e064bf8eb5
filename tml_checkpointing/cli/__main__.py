"""``python -m tml_checkpointing.cli``: the same command as the ``tml`` entry point."""

import sys

from .app import main

if __name__ == "__main__":  # not when merely imported (pkgutil.walk_packages, docs tools)
    sys.exit(main())
