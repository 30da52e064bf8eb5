"""Stale state: checkpoint directories that never got their commit marker.

A writer killed mid-save leaves ``<save_dir>/<step>`` without ``.snapshot_metadata``. Readers
ignore such directories, but they take space. They cannot be told apart from a checkpoint
another process is writing *right now*, so only ones whose newest file is older than a
threshold are listed or removed, and only on request (CLI ``clean-incomplete``), never
automatically. Age comes from the newest modification time of anything in the directory,
read from one recursive listing (``LastModified`` on object stores).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from torchsnapshot.snapshot import SNAPSHOT_METADATA_FNAME

from .discovery import is_committed, parse_step
from .errors import InvalidArgumentError
from .filesystem import (
    StorageOptions,
    fsync_directory,
    invalidate_listing,
    is_local,
    join_url,
    resolve,
)
from .integrity import mtime_of
from .retention import assert_save_dir

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IncompleteCheckpoint:
    """An uncommitted step directory; ``age_s`` counts from its newest file."""

    step: int
    path: str
    newest_mtime: float | None
    age_s: float | None
    size: int


def find_incomplete(
    save_dir: str,
    older_than_s: float,
    *,
    storage_options: StorageOptions | None = None,
    now: float | None = None,
) -> list[IncompleteCheckpoint]:
    """Uncommitted step directories under ``save_dir`` whose newest file is older than
    ``older_than_s`` seconds, sorted by step. Directories with no readable age are skipped."""
    return [
        entry
        for entry in scan_incomplete(save_dir, storage_options=storage_options, now=now)
        if entry.age_s is not None and entry.age_s >= _checked(older_than_s)
    ]


def scan_incomplete(
    save_dir: str, *, storage_options: StorageOptions | None = None, now: float | None = None
) -> list[IncompleteCheckpoint]:
    """Every uncommitted step directory under ``save_dir`` with its age, in one listing."""
    assert_save_dir(save_dir, storage_options)
    fs, root = resolve(save_dir, storage_options)
    root = root.rstrip("/")
    now = time.time() if now is None else now
    groups = _group_by_step(fs, root)
    found: list[IncompleteCheckpoint] = []
    for name, (infos, committed) in sorted(groups.items(), key=lambda item: int(item[0])):
        if committed:
            continue
        times = [t for t in (mtime_of(info) for info in infos) if t is not None]
        newest = max(times) if times else None
        found.append(
            IncompleteCheckpoint(
                step=int(name),
                path=join_url(save_dir, name),
                newest_mtime=newest,
                age_s=None if newest is None else max(0.0, now - newest),
                size=sum(
                    int(info.get("size") or 0) for info in infos if info.get("type") != "directory"
                ),
            )
        )
    return found


def clean_incomplete(
    save_dir: str,
    older_than_s: float,
    *,
    dry_run: bool = False,
    storage_options: StorageOptions | None = None,
) -> list[IncompleteCheckpoint]:
    """Remove (or with ``dry_run`` only list) incomplete checkpoints older than the threshold.

    Each is re-checked just before removal: if it got committed or written to meanwhile
    (a live writer), it is left alone.
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
        fs, path = resolve(candidate.path, storage_options)
        fs.rm(path, recursive=True)
        logger.info("Removed incomplete checkpoint %s (age %.0fs).", path, candidate.age_s or 0)
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


def _group_by_step(fs: Any, root: str) -> dict[str, tuple[list[dict[str, Any]], bool]]:
    """``{step dir name: (infos of everything inside, committed?)}`` from one ``find``."""
    invalidate_listing(fs, root)
    try:
        listing = fs.find(root, detail=True, withdirs=True)
    except FileNotFoundError:
        return {}
    prefix = f"{root}/"
    groups: dict[str, tuple[list[dict[str, Any]], bool]] = {}
    for key, info in listing.items():
        key = key.rstrip("/")
        if not key.startswith(prefix):
            continue
        parts = key[len(prefix) :].split("/")
        if parse_step(parts[0]) is None:
            continue
        if len(parts) == 1 and info.get("type") != "directory":
            continue  # a file named like a step is not a checkpoint directory
        infos, committed = groups.get(parts[0], ([], False))
        infos.append(info)
        committed = committed or (
            len(parts) == 2 and parts[1] == SNAPSHOT_METADATA_FNAME and (info.get("size") or 0) > 0
        )
        groups[parts[0]] = (infos, committed)
    return groups


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
    from .retention import delete_checkpoint

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = f"{checkpoint.rstrip('/')}.{reason}-{stamp}"
    fs, source = resolve(checkpoint, storage_options)
    _, destination = resolve(target, storage_options)
    if is_local(fs):
        os.rename(source, destination)
        fsync_directory(os.path.dirname(source.rstrip("/")) or ".")
    else:
        fs.copy(source.rstrip("/"), destination, recursive=True)
        delete_checkpoint(checkpoint, storage_options)
    invalidate_listing(fs, source.rsplit("/", 1)[0])
    logger.warning("Moved %s aside to %s (%s).", checkpoint, target, reason)
    return target
