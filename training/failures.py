"""Which failures a retry of the same epoch cannot fix (the epoch task does not retry them).

Why: a retry restores the newest checkpoint and trains the epoch again. That helps after a
transient fault (a flaky read, an injected failure), but not when the checkpoint does not fit
the model, the run's parameters were refused, another writer holds the save_dir, the process is
being preempted, or the disk or quota is full: retrying those only repeats the failure (and
writes more into a full disk) before the run fails anyway, with the real error buried.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

from tml_checkpointing.errors import (
    CheckpointShapeMismatchError,
    PreemptedError,
    SaveDirLockedError,
)

from .run_info import RunConfigChangedError

PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    CheckpointShapeMismatchError,
    RunConfigChangedError,
    SaveDirLockedError,
    PreemptedError,
)
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def retry_cannot_help(error: BaseException | None) -> bool:
    """Whether ``error`` -- or anything in its cause/context chain -- is permanent."""
    return any(isinstance(link, PERMANENT_ERRORS) for link in _chain(error)) or is_out_of_space(
        error
    )


def is_out_of_space(error: BaseException | None) -> bool:
    """Whether the disk (or a quota) was full somewhere in ``error``'s chain."""
    return any(
        isinstance(link, OSError) and link.errno in NO_SPACE_ERRNOS for link in _chain(error)
    )


def _chain(error: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__
