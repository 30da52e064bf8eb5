"""The first steps of every save, whichever writer then writes it.

Why one place: a save may start only while this run holds its save_dir's lock, never over a
committed checkpoint, never into a step directory holding a torn commit (a 0-byte marker over
old data, moved aside first: :mod:`.torn_steps`), and it claims its directory (``.writing``)
before any data, so cleanup keeps off it. A failure at any step says the same thing: nothing
was committed.
"""

from __future__ import annotations

import torch.distributed as dist

from .. import events
from ..errors import CheckpointExistsError, CheckpointReadError, CheckpointWriteError
from ..format.layout import marker_commits, marker_torn, step_name
from ..storage.filesystem import StorageOptions, join_url
from ..storage.locking import assert_holding
from .claims import write_claim
from .torn_steps import marker_size, set_aside_torn


def save_failed(global_step: int, path: str, detail: str) -> CheckpointWriteError:
    """The one wording of a failed save."""
    return CheckpointWriteError(
        f"saving step {global_step} to {path} failed, nothing was committed: {detail}"
    )


def open_save(save_dir: str, global_step: int, storage_options: StorageOptions) -> str:
    """Check the lock and the step, emit ``SAVE_STARTED``, claim the directory; its path."""
    assert_holding(save_dir, storage_options)  # a run that lost its lock stops
    path = join_url(save_dir, step_name(global_step))
    try:
        size = marker_size(path, storage_options)
    except CheckpointReadError as error:  # a save that cannot look cannot write either
        raise save_failed(global_step, path, str(error)) from error
    if marker_commits(size):
        raise CheckpointExistsError(
            f"checkpoint {path} is already committed; refusing to overwrite it. Save under "
            "another step or another save_dir."
        )
    if marker_torn(size) and _sole_writer():
        try:
            set_aside_torn(path, storage_options)  # never write beside old data
        except CheckpointWriteError as error:
            raise save_failed(global_step, path, str(error)) from error
    events.emit(events.SAVE_STARTED, path=path, step=global_step)
    try:
        write_claim(path, storage_options)  # before any data: cleanup keeps off it
    except CheckpointWriteError as error:
        events.emit(events.SAVE_FAILED, path=path, step=global_step, error=repr(error))
        raise save_failed(global_step, path, str(error)) from error
    return path


def _sole_writer() -> bool:
    """Whether this process writes the whole save (no job of several ranks).

    Only then is a torn step moved aside here: in a job, another rank may already have
    written its part of this save into the directory, and moving it would take that along.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return True
    return dist.get_world_size() == 1
