"""Deleting checkpoints without ever leaving one half-deleted and still "committed".

The protocol: the commit marker goes first (durably, on local disk with the directory
fsync'd), then everything else. A kill between the two leaves an uncommitted directory,
which every reader ignores and ``clean-incomplete`` lists. Several at once go children
first: a delta before its parent, so no committed delta ever outlives the checkpoint its
chain starts from. Retention (:mod:`.retention`) decides what to delete; this module how.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping

from .. import events
from ..catalog.discovery import CheckpointPath
from ..format.layout import COMMIT_MARKER
from ..reading.chains import read_chain_link
from ..storage.faults import writing
from ..storage.filesystem import StorageOptions, fsync_directory, is_local, resolve


def chain_parents(
    committed: Iterable[CheckpointPath], storage_options: StorageOptions | None = None
) -> dict[int, int]:
    """``{step: parent step}`` of the delta checkpoints among ``committed`` (one marker read
    each; a marker that went away or does not parse names no parent)."""
    parents: dict[int, int] = {}
    for entry in committed:
        link = read_chain_link(entry.path, storage_options)
        if link is not None and link.parent is not None and link.parent.isdigit():
            parents[entry.step] = int(link.parent)
    return parents


def children_first(
    victims: list[CheckpointPath], parents: Mapping[int, int]
) -> list[CheckpointPath]:
    """Deletion order: oldest first, except that a delta goes before its parent, so a kill
    half-way never leaves a committed delta whose parent is gone."""
    by_step = {victim.step: victim for victim in victims}
    children: dict[int, list[int]] = {}
    for child, parent in parents.items():
        if child in by_step and parent in by_step:
            children.setdefault(parent, []).append(child)
    ordered: list[CheckpointPath] = []
    done: set[int] = set()

    def emit(step: int) -> None:
        for child in sorted(children.get(step, []), reverse=True):
            if child not in done:
                emit(child)
        done.add(step)
        ordered.append(by_step[step])

    for victim in victims:
        if victim.step not in done:
            emit(victim.step)
    return ordered


def delete_checkpoint(checkpoint: str, storage_options: StorageOptions | None = None) -> None:
    """Remove one checkpoint: the commit marker first (durably), then everything else.

    A kill between the two steps leaves an uncommitted directory, which every reader ignores.
    """
    fs, root = resolve(checkpoint, storage_options)
    root = root.rstrip("/")
    marker = f"{root}/{COMMIT_MARKER}"
    events.emit(events.DELETE_STARTED, path=checkpoint)
    with writing(f"(deleting) {checkpoint}"):
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(marker)
        if is_local(fs):
            fsync_directory(root)
        events.emit(events.DELETE_UNCOMMITTED, path=checkpoint)
        with contextlib.suppress(FileNotFoundError):
            fs.rm(root, recursive=True)
    events.emit(events.DELETE_DONE, path=checkpoint)
