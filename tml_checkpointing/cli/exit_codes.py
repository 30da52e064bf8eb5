"""The exit codes of ``tml`` (docs/cli.md has the table), in one place.

Its own module, importing nothing: the application's ``tml`` (``flows/cli.py``) uses them
before it may import anything heavy, and scripts can branch on them without the CLI.
Code 4 (the Prefect API is unreachable) belongs to the application: ``flows/api_check.py``.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_CORRUPT = 1  # a checkpoint failed verification (CorruptCheckpointError)
EXIT_BAD_INPUT = 2  # bad arguments, or a refusal that names what to change
EXIT_STORAGE = 3  # storage could not be read or written; never judged corrupt
EXIT_SAVE_DIR_LOCKED = 5  # another live run holds the save_dir's writer lock: wait, or use another
