"""Make this repository's training application runnable from the project's virtualenv.

The application (``flows/``, ``tasks/``, ``training/``, ``recipes/``) is never installed into
site-packages under those generic names (the wheel holds the library alone): it runs from the
repository, as a Prefect project does. ``make setup`` calls this script once the library is
installed, to do what running from the repository needs, and nothing more:

* a ``.pth`` file puts the repository root on the virtualenv's ``sys.path``, so that
  ``python -m flows.cli`` and Prefect workers started from any directory find the code (the same
  effect as ``PYTHONPATH=<repo>``; nothing is copied);
* ``<venv>/bin/tml`` becomes the application's command (``flows.cli``): the library's ``tml``,
  which has the ``checkpoints`` group, plus ``train``, ``evaluate`` and ``retrain``.

Run it with the virtualenv's interpreter: ``.venv/bin/python scripts/install_application.py``.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
PTH_NAME = "tml_checkpointing_application.pth"
LAUNCHER = """#!{python}
# Written by scripts/install_application.py (make setup): the training application's `tml`,
# run from {repository}. `pip install` of the library puts the library's own `tml` back.
import sys

from flows.cli import main

if __name__ == "__main__":
    sys.exit(main())
"""


def main() -> int:
    if sys.prefix == sys.base_prefix:
        print("error: run this with a virtualenv's python (make setup does)", file=sys.stderr)
        return 2
    site_packages = Path(sysconfig.get_paths()["purelib"])
    (site_packages / PTH_NAME).write_text(f"{REPOSITORY}\n")
    launcher = Path(sys.prefix) / "bin" / "tml"
    launcher.write_text(LAUNCHER.format(python=sys.executable, repository=REPOSITORY))
    os.chmod(launcher, 0o755)
    print(f"application: {REPOSITORY} on sys.path ({PTH_NAME}); {launcher} runs flows.cli")
    return 0


if __name__ == "__main__":
    sys.exit(main())
