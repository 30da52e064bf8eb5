"""Step directories whose commit marker is torn (there, but empty): moved aside, never deleted.

Why: plain torchsnapshot writes its marker in place, so a kill during that write leaves a
0-byte ``.snapshot_metadata`` over data that may be whole (a 1 MB checkpoint was). Such a
directory is not committed, yet it is not a crashed writer's leftovers either: deleting it
(``clean-incomplete`` did) loses the only copy, and a new save of that step writing into it
(a resumed run did) leaves the old data beside the new checkpoint's, where a reader takes the
step for a save_dir and its rank directory ``0/`` for a step. Truncated files are moved aside,
never deleted; a truncated marker is too: to ``<step>.torn-marker-<UTC time>``, a name that is
not a step, where it stays for inspection until someone removes it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid

from .. import events
from ..format.layout import COMMIT_MARKER, TORN_MARKER_REASON, quarantine_name
from ..storage.faults import reading, writing
from ..storage.filesystem import (
    StorageOptions,
    fsync_directory,
    invalidate_listing,
    is_local,
    resolve,
)

logger = logging.getLogger(__name__)


def marker_size(step_dir: str, storage_options: StorageOptions | None = None) -> int | None:
    """The size of ``step_dir``'s commit marker (``None``: there is none): one lookup says
    both committed (:func:`~tml_checkpointing.format.layout.marker_commits`) and torn
    (:func:`~tml_checkpointing.format.layout.marker_torn`)."""
    fs, root = resolve(step_dir, storage_options)
    root = root.rstrip("/")
    invalidate_listing(fs, root)
    with reading(f"the commit marker of {step_dir}"):
        try:
            return int(fs.size(f"{root}/{COMMIT_MARKER}"))
        except (FileNotFoundError, NotADirectoryError):
            return None


def set_aside_torn(step_dir: str, storage_options: StorageOptions | None = None) -> str:
    """Move ``step_dir`` (a step with a torn marker) to ``<step>.torn-marker-<UTC time>``;
    the new path, or ``""`` when it was gone already (another process moved it).

    Local disk: one atomic rename (a directory renamed meanwhile raises nothing here).
    Object stores: a copy, then the original removed, its marker first (a kill in between
    leaves the original uncommitted and the copy whole; the next attempt copies again).
    """
    target = quarantine_name(step_dir, TORN_MARKER_REASON)
    fs, source = resolve(step_dir, storage_options)
    source = source.rstrip("/")
    _, destination = resolve(target, storage_options)
    with writing(f"(moving aside) {step_dir}"):
        if fs.exists(destination):  # moved aside once already this second: never merge
            target = f"{target}-{uuid.uuid4().hex[:8]}"
            destination = resolve(target, storage_options)[1]
        if is_local(fs):
            try:
                os.rename(source, destination)
            except FileNotFoundError:
                return ""
            fsync_directory(os.path.dirname(source) or ".")
        else:
            if not fs.exists(source):
                return ""
            fs.copy(source, destination, recursive=True)
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(f"{source}/{COMMIT_MARKER}")
            with contextlib.suppress(FileNotFoundError):
                fs.rm(source, recursive=True)
    invalidate_listing(fs, source.rsplit("/", 1)[0])
    logger.warning(
        "Moved %s aside to %s: its commit marker is empty (a commit torn by a crash); its data "
        "is kept there.",
        step_dir,
        target,
    )
    events.emit(events.QUARANTINED, path=step_dir, target=target, reason=TORN_MARKER_REASON)
    return target
