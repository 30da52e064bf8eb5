"""Stale state: checkpoint directories that never got their commit marker.

A writer killed mid-save leaves ``<save_dir>/<step>`` without ``.snapshot_metadata``. Readers
ignore such directories, but they take space. One whose marker is there but empty (a commit
torn mid-write, over data that may be whole) is moved aside rather than removed
(:mod:`tml_checkpointing.writing.torn_steps`). They cannot be told apart from a checkpoint
another process is writing *right now*, so only ones whose newest file is older than a
threshold are listed or removed, and only on request (CLI ``clean-incomplete``), never
automatically. Age comes from the newest modification time of anything in the directory,
read from one recursive listing (``LastModified`` on object stores). A directory claimed by a
save in flight (:mod:`tml_checkpointing.writing.claims`) whose process is alive is never removed,
whatever its age.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from .. import events
from ..catalog.discovery import is_committed
from ..catalog.save_dir import assert_save_dir
from ..errors import InvalidArgumentError
from ..format.layout import StepListing, group_by_step, quarantine_name
from ..storage.faults import reading, writing
from ..storage.filesystem import (
    StorageOptions,
    find_tree,
    fsync_directory,
    invalidate_listing,
    is_local,
    join_url,
    mtime_of,
    resolve,
)
from ..writing.claims import read_claim
from ..writing.torn_steps import set_aside_torn
from .deletion import delete_checkpoint

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IncompleteCheckpoint:
    """An uncommitted step directory; ``age_s`` counts from its newest file."""

    step: int
    path: str
    newest_mtime: float | None
    age_s: float | None
    size: int
    claimed_by: str = ""  # the live save that claims it ("" when none)
    torn: bool = False  # its commit marker is there but empty: moved aside, never removed
    moved_to: str = ""  # where clean_incomplete moved it ("" when removed, or not yet handled)


def find_incomplete(
    save_dir: str,
    older_than_s: float,
    *,
    storage_options: StorageOptions | None = None,
    now: float | None = None,
) -> list[IncompleteCheckpoint]:
    """Uncommitted step directories under ``save_dir`` whose newest file is older than
    ``older_than_s`` seconds and that no live save claims, sorted by step. Directories with
    no readable age are skipped."""
    threshold = _checked(older_than_s)
    return [
        entry
        for entry in scan_incomplete(save_dir, storage_options=storage_options, now=now)
        if entry.age_s is not None and entry.age_s >= threshold and not entry.claimed_by
    ]


def scan_incomplete(
    save_dir: str, *, storage_options: StorageOptions | None = None, now: float | None = None
) -> list[IncompleteCheckpoint]:
    """Every uncommitted step directory under ``save_dir`` with its age, in one listing."""
    assert_save_dir(save_dir, storage_options)
    fs, root = resolve(save_dir, storage_options)
    root = root.rstrip("/")
    now = time.time() if now is None else now
    groups = _group_by_step(fs, root, save_dir)
    found: list[IncompleteCheckpoint] = []
    for group in sorted(groups.values(), key=lambda g: g.step):
        if group.committed:
            continue
        path = join_url(save_dir, group.name)
        times = [t for t in (mtime_of(info) for info in group.files.values()) if t is not None]
        newest = max(times) if times else None
        found.append(
            IncompleteCheckpoint(
                step=group.step,
                path=path,
                newest_mtime=newest,
                age_s=None if newest is None else max(0.0, now - newest),
                size=sum(int(info.get("size") or 0) for info in group.files.values()),
                claimed_by=_live_claimant(path, group, storage_options),
                torn=group.torn,
            )
        )
    return found


def _live_claimant(path: str, group: StepListing, storage_options: StorageOptions | None) -> str:
    """Who is writing ``path`` right now ("" when nobody alive claims it)."""
    if not group.claimed:
        return ""
    claim = read_claim(path, storage_options)
    if claim is None or claim.process_alive() is False:
        return ""
    if claim.process_alive() is None:
        return ""  # another host: the age threshold decides (see the module docstring)
    return claim.describe()


def clean_incomplete(
    save_dir: str,
    older_than_s: float,
    *,
    dry_run: bool = False,
    storage_options: StorageOptions | None = None,
) -> list[IncompleteCheckpoint]:
    """Remove (or with ``dry_run`` only list) incomplete checkpoints older than the threshold.

    Each is re-checked just before removal: if it got committed or written to meanwhile
    (a live writer), it is left alone. One whose commit marker is there but empty (a commit
    torn by a crash, over data that may be whole) is moved aside to
    ``<step>.torn-marker-<UTC time>`` instead, never removed; its entry's ``moved_to`` says
    where. Returns what was removed or moved aside.
    """
    candidates = find_incomplete(save_dir, older_than_s, storage_options=storage_options)
    if dry_run:
        return candidates
    removed: list[IncompleteCheckpoint] = []
    for candidate in candidates:
        again = [
            e
            for e in find_incomplete(save_dir, older_than_s, storage_options=storage_options)
            if e.step == candidate.step
        ]
        if not again or is_committed(candidate.path, storage_options):
            logger.info("Leaving %s: it changed since it was listed.", candidate.path)
            continue
        if candidate.torn:
            target = set_aside_torn(candidate.path, storage_options)
            if target:
                removed.append(dataclasses.replace(candidate, moved_to=target))
            continue
        fs, path = resolve(candidate.path, storage_options)
        with writing(f"(removing) {candidate.path}"):
            fs.rm(path, recursive=True)
        logger.info("Removed incomplete checkpoint %s (age %.0fs).", path, candidate.age_s or 0)
        events.emit(events.INCOMPLETE_REMOVED, path=candidate.path)
        removed.append(candidate)
    return removed


def _checked(older_than_s: float) -> float:
    if isinstance(older_than_s, bool) or not isinstance(older_than_s, int | float):
        raise InvalidArgumentError(
            f"older_than_s must be a number of seconds, got {older_than_s!r}"
        )
    if older_than_s < 0:
        raise InvalidArgumentError(f"older_than_s must be >= 0, got {older_than_s}")
    return float(older_than_s)


def _group_by_step(fs: Any, root: str, save_dir: str) -> dict[str, StepListing]:
    """Everything under each step directory, from one ``find``."""
    invalidate_listing(fs, root)
    with reading(f"the checkpoints in {save_dir}"):
        listing = find_tree(fs, root, withdirs=True)
    return group_by_step(root, listing)


def quarantine_checkpoint(
    checkpoint: str, *, reason: str = "corrupt", storage_options: StorageOptions | None = None
) -> str:
    """Move a committed checkpoint aside to ``<step>.<reason>-<UTC time>``; return the new path.

    For a checkpoint that fails verification and stands in the way of resumption: training
    resumes from an older valid one and must be able to write this step again, yet nothing
    is ever deleted automatically. The new name is not a step number, so readers ignore it;
    it stays for inspection (``tml checkpoints verify``) until someone removes it.
    On local disk this is one atomic rename; on object stores a copy, then removal of the
    original, marker first (a kill in between leaves an uncommitted original, never two
    committed copies).
    """
    target = quarantine_name(checkpoint, reason)
    fs, source = resolve(checkpoint, storage_options)
    _, destination = resolve(target, storage_options)
    with writing(f"(moving aside) {checkpoint}"):
        if is_local(fs):
            os.rename(source, destination)
            fsync_directory(os.path.dirname(source.rstrip("/")) or ".")
        else:
            fs.copy(source.rstrip("/"), destination, recursive=True)
            delete_checkpoint(checkpoint, storage_options)
    invalidate_listing(fs, source.rsplit("/", 1)[0])
    logger.warning("Moved %s aside to %s (%s).", checkpoint, target, reason)
    events.emit(events.QUARANTINED, path=checkpoint, target=target, reason=reason)
    return target
