"""The files of one checkpoint being written, and its commit protocol; no torch in here.

Why a module of its own: the writer process only moves bytes, hashes them and talks to
fsspec. Importing torch and torchsnapshot (through the torchsnapshot storage plugin) cost it
seconds before its first write, on every fresh process, and many more on a loaded machine.
So the writing and the commit live here, free of torch, and
:class:`~tml_checkpointing.storage.plugin.FsspecStoragePlugin` (torchsnapshot's writer
thread, and every read) delegates to :class:`CheckpointFiles`. What only torch knows (this
process's rank, a marker parsed as YAML) is handed in by the plugin.

Commit protocol (the invariant "a checkpoint exists only once committed"), in order:
``save.data_written``; other ranks' sidecar parts merged (a torchsnapshot multi-rank save);
every recorded file checked against one listing; the sidecar written (as durably as the
data); ``save.sidecar_written``; the last check before the marker (the writer lock);
the marker written atomically (:func:`~tml_checkpointing.storage.filesystem.replace_file`);
on local disk the new directory entries fsynced; the save's claim removed;
``save.committed``.

A save may also be written in pieces by several writers and committed by one: each writes
its files with :meth:`CheckpointFiles.write_data` and hands over :meth:`~CheckpointFiles.records`;
the committer takes them in with :meth:`~CheckpointFiles.merge_records` and calls
:meth:`~CheckpointFiles.commit`, so its files-still-there check and its sidecar cover every
writer's files.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable

from .. import events
from ..errors import CheckpointWriteError
from ..format.layout import COMMIT_MARKER, INTEGRITY_SIDECAR, SAVE_CLAIM, integrity_part_name
from ..format.sidecar import SidecarFormatError, SidecarRecorder, parse_sidecar
from .filesystem import (
    StorageOptions,
    find_tree,
    fsync_directory,
    invalidate_listing,
    is_local,
    put_bytes,
    replace_file,
    resolve,
)
from .locking import assert_holding

#: Reads the world size out of a commit marker (torchsnapshot's metadata).
WorldSizeOf = Callable[[bytes], int]


def world_size_from_json(metadata: bytes) -> int:
    """The ``world_size`` of a marker as torchsnapshot writes it (JSON, a subset of YAML)."""
    return int(json.loads(metadata)["world_size"])


class CheckpointFiles:
    """The files of one checkpoint being written (recorded as written) and its commit.

    Args:
        url: the checkpoint's URL (``<save_dir>/<step>``), as messages and events name it.
        storage_options: the filesystem's options (``tml_*`` options are the library's own).
        rank: the rank writing through this object; a rank other than 0 in a multi-rank
            torchsnapshot save stores its records as ``.integrity.json.rank-<r>`` after
            each file it writes, for rank 0 to merge.
        world_size_of: how to read the world size out of the marker, to find the other
            ranks' parts at commit; ``None`` (one process): there are none to merge.
    """

    def __init__(
        self,
        url: str,
        storage_options: StorageOptions | None = None,
        *,
        rank: int = 0,
        world_size_of: WorldSizeOf | None = None,
    ) -> None:
        self.url = url
        self.fs, root = resolve(url, storage_options)
        self.root = root.rstrip("/")
        self.local = is_local(self.fs)
        self.rank = rank
        self._world_size_of = world_size_of
        self._created_dirs: set[str] = set()
        self._integrity = SidecarRecorder()
        self._part_lock = threading.Lock()
        # Last check before the marker; the writer process replaces it with the training
        # process's answer (it holds the lock, the writer process does not).
        self.before_marker: Callable[[], None] = self._assert_lock_held

    def full_path(self, relative: str) -> str:
        """``relative`` inside the checkpoint, as the filesystem spells it."""
        return f"{self.root}/{relative.lstrip('/')}"

    # -- writing ---------------------------------------------------------------------------

    def write_data(self, relative: str, buf: bytes | memoryview) -> None:
        """Store one data file (fsynced on local disk) and record its size and checksums."""
        self.write_file(self.full_path(relative), buf)
        # Recorded only once stored: a failed write leaves no entry claiming it exists.
        self._integrity.record(relative, buf)
        if self.rank != 0:
            # Before this write returns: the part is complete once this rank's data is.
            with self._part_lock:  # the last rewrite holds every record so far
                part = self.full_path(integrity_part_name(self.rank))
                self.write_file(part, self._integrity.to_bytes())

    def forget(self, relative: str) -> None:
        """A file torchsnapshot deleted again: no longer part of the checkpoint."""
        self._integrity.forget(relative)

    def write_file(self, path: str, buf: bytes | memoryview) -> None:
        """Store ``path`` (a full path) whole; on local disk fsynced before returning."""
        if not self.local:
            # Object stores and memory:// keep the bytes: hand over a copy, never a view
            # into a staging buffer the caller may reuse.
            put_bytes(self.fs, path, bytes(buf))  # bounded in time, never creates a bucket
            return
        self._ensure_parent(path)
        with self.fs.open(path, "wb") as handle:
            handle.write(buf)
            handle.flush()
            os.fsync(handle.fileno())

    def _ensure_parent(self, path: str) -> None:
        parent = path.rsplit("/", 1)[0]
        if parent not in self._created_dirs:
            self.fs.makedirs(parent, exist_ok=True)
            self._created_dirs.add(parent)

    # -- records of several writers ---------------------------------------------------------

    def records(self) -> bytes:
        """The records of every file written (or merged) so far, as sidecar JSON."""
        return self._integrity.to_bytes()

    def merge_records(self, raw: bytes, *, source: str) -> None:
        """Take in another writer's :meth:`records` (``source`` names it in the error).

        Unreadable records fail the commit: the sidecar would otherwise silently cover less
        than the checkpoint.
        """
        try:
            sidecar = parse_sidecar(raw)
        except SidecarFormatError as error:
            raise CheckpointWriteError(
                f"{source}'s integrity records for {self.url} are unreadable ({error}); "
                "nothing was committed"
            ) from error
        if sidecar.block_size != self._integrity.block_size:
            raise CheckpointWriteError(
                f"{source}'s integrity records for {self.url} use {sidecar.block_size}-byte "
                f"blocks, not {self._integrity.block_size}: written by another version of "
                "tml_checkpointing? Nothing was committed"
            )
        self._integrity.merge(sidecar)

    # -- commit ----------------------------------------------------------------------------

    def commit(self, metadata: bytes) -> None:
        """Run the commit protocol (module docstring): sidecar, marker last, claim removed."""
        events.emit(events.SAVE_DATA_WRITTEN, path=self.url)
        parts = self._merge_rank_parts(metadata)
        self._check_files_still_there()
        # The sidecar is data as far as durability goes: written (and fsynced) before the
        # marker, so a committed checkpoint always has the sidecar it was written with.
        self.write_file(self.full_path(INTEGRITY_SIDECAR), self._integrity.to_bytes())
        events.emit(events.SAVE_SIDECAR_WRITTEN, path=self.url)
        for part in parts:  # merged into the sidecar: not left beside it
            self.fs.rm_file(part)
        self.before_marker()  # the run lost its writer lock: no commit
        replace_file(self.fs, self.full_path(COMMIT_MARKER), metadata)
        if self.local:
            # Make the new directory entries durable, deepest first, up to save_dir.
            for directory in sorted(self._directories(), key=len, reverse=True):
                fsync_directory(directory)
            fsync_directory(os.path.dirname(self.root) or ".")
        self._remove_claim()
        events.emit(events.SAVE_COMMITTED, path=self.url)

    def _directories(self) -> set[str]:
        """The directories holding the checkpoint's files, up to its own: those this object
        created, and those of files other writers wrote (merged records), which no one has
        fsynced yet."""
        found = set(self._created_dirs)
        found.add(self.root)
        for relative in self._integrity.sizes():
            parts = relative.split("/")[:-1]
            for depth in range(1, len(parts) + 1):
                found.add(self.full_path("/".join(parts[:depth])))
        return found

    def _assert_lock_held(self) -> None:
        assert_holding(self.fs.unstrip_protocol(os.path.dirname(self.root)))

    def _merge_rank_parts(self, metadata: bytes) -> list[str]:
        """Take the other ranks' sidecar parts into this (rank 0's) records; their paths.

        A rank that wrote no data file has no part.
        """
        if self._world_size_of is None:
            return []  # one process: nothing to merge, and no manifest to parse
        world_size = self._world_size_of(metadata)
        found: list[str] = []
        for rank in range(1, world_size):
            path = self.full_path(integrity_part_name(rank))
            try:
                raw = self.fs.cat_file(path)
            except FileNotFoundError:
                continue
            self.merge_records(raw, source=f"rank {rank}")
            found.append(path)
        return found

    def _check_files_still_there(self) -> None:
        """Refuse to commit over data that went away (one listing, before the marker)."""
        invalidate_listing(self.fs, self.root)
        found = find_tree(self.fs, self.root)
        prefix = f"{self.root}/"
        sizes = {
            key[len(prefix) :]: int(info.get("size") or 0)
            for key, info in found.items()
            if key.startswith(prefix)
        }
        gone = [name for name, size in self._integrity.sizes().items() if sizes.get(name) != size]
        if gone:
            raise CheckpointWriteError(
                f"{len(gone)} data file(s) of {self.url} were removed or changed while it was "
                f"being written (first: {sorted(gone)[0]}); nothing was committed. Was "
                "`clean-incomplete` or a manual delete run on a live save?"
            )

    def _remove_claim(self) -> None:
        try:
            self.fs.rm_file(self.full_path(SAVE_CLAIM))
        except FileNotFoundError:
            return
        if self.local:
            fsync_directory(self.root)
