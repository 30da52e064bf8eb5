"""A torchsnapshot ``StoragePlugin`` that does all I/O through fsspec, with an atomic commit.

torchsnapshot picks a storage plugin from the URL's scheme. Its built-in ``s3`` plugin ignores
``storage_options`` and opens a client per object, and every built-in plugin writes the commit
marker ``.snapshot_metadata`` in place, so a kill during that write leaves a half-written marker
that readers then trip over. This plugin is reached through torchsnapshot's documented
extension point (the ``storage_plugins`` entry-point group) under the scheme ``tml-fsspec``:
``tml-fsspec://s3://bucket/run/100`` means "the checkpoint at ``s3://bucket/run/100``, through
fsspec". The on-disk format is unchanged: plain ``torchsnapshot.Snapshot(path)`` reads a local
checkpoint written this way.

Commit protocol (the invariant "a checkpoint exists only once committed"):

* local disk: every data file is fsynced when written; the marker is written to a temporary
  name, fsynced, renamed over ``.snapshot_metadata`` and the directories are fsynced, so a
  crash leaves either no marker or a complete one;
* object stores (S3, GCS, memory): a single PUT is atomic, so the marker is one PUT issued
  after every data object has been stored.

Integrity: each data file's size and block checksums are recorded as it is written (on the
buffer, in the writer thread) and stored as ``.integrity.json`` just before the marker, as
durably as the data (see :mod:`tml_checkpointing.format.sidecar`). In a multi-rank save each rank
other than 0 also stores its records so far as ``.integrity.json.rank-<r>`` after each data
file it writes (so they are complete once its data is: before torchsnapshot's commit
barrier); rank 0, which alone writes the marker, merges them into ``.integrity.json`` and
removes them, so the sidecar covers every rank's files. Reads are verified as they pass:
each range is widened to block boundaries, hashed and compared, so a flipped bit anywhere in
what a restore reads raises :class:`~tml_checkpointing.errors.CorruptCheckpointError` naming
the file (``storage_options={"tml_verify_reads": False}`` turns that off).

A save whose files disappear before commit (removed by hand or by a cleanup racing it) fails
instead of committing: the files recorded are checked against one listing right before the
marker is written.
"""

from __future__ import annotations

import asyncio
import io
import os
import threading
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
from torchsnapshot.io_types import ReadIO, StoragePlugin, WriteIO
from torchsnapshot.manifest import SnapshotMetadata

from .. import events
from ..errors import CheckpointWriteError, corrupt_checkpoint
from ..format.layout import COMMIT_MARKER, INTEGRITY_SIDECAR, SAVE_CLAIM, integrity_part_name
from ..format.sidecar import Sidecar, SidecarFormatError, SidecarRecorder, parse_sidecar
from .faults import reading
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

TRANSPORT_SCHEME = "tml-fsspec"
VERIFY_READS_OPTION = "tml_verify_reads"  # storage option read by this plugin, not the backend


def transport_url(url: str) -> str:
    """The URL torchsnapshot is given so that it routes I/O through :class:`FsspecStoragePlugin`."""
    return f"{TRANSPORT_SCHEME}://{url}"


def fsspec_storage_plugin(path: str, storage_options: dict[str, Any] | None) -> StoragePlugin:
    """Factory registered under the ``storage_plugins`` entry-point group."""
    return FsspecStoragePlugin(path, storage_options)


class FsspecStoragePlugin(StoragePlugin):
    """Reads and writes one snapshot directory through an fsspec filesystem."""

    def __init__(self, root: str, storage_options: StorageOptions | None = None) -> None:
        options = dict(storage_options or {})
        self.verify_reads = bool(options.pop(VERIFY_READS_OPTION, True))
        self.url = root
        self.fs, self.root = resolve(root, options)
        self.root = self.root.rstrip("/")
        self._local = is_local(self.fs)
        self._created_dirs: set[str] = set()
        self._integrity = SidecarRecorder()
        self._rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self._part_lock = threading.Lock()
        self._sidecar: Sidecar | None = None
        self._sidecar_loaded = False
        self._sidecar_lock = threading.Lock()
        # Last check before the marker; the writer process replaces it with the training
        # process's answer (it holds the lock, this process does not).
        self.before_marker: Callable[[], None] = self._assert_lock_held

    def _full_path(self, relative: str) -> str:
        return f"{self.root}/{relative.lstrip('/')}"

    async def write(self, write_io: WriteIO) -> None:
        if write_io.path == COMMIT_MARKER:
            await asyncio.to_thread(self._commit, bytes(write_io.buf))
        else:
            await asyncio.to_thread(self._write_data, write_io.path, write_io.buf)

    async def read(self, read_io: ReadIO) -> None:
        await asyncio.to_thread(self._read, read_io)

    async def delete(self, path: str) -> None:
        self._integrity.forget(path)
        await asyncio.to_thread(self.fs.rm_file, self._full_path(path))

    async def close(self) -> None:
        return None

    # -- writing ---------------------------------------------------------------------------

    def _write_data(self, relative: str, buf: bytes | memoryview) -> None:
        self._write_file(self._full_path(relative), buf)
        # Recorded only once stored: a failed write leaves no entry claiming it exists.
        self._integrity.record(relative, buf)
        if self._rank != 0:
            # Before this write returns: the part is complete once this rank's data is.
            with self._part_lock:  # the last rewrite holds every record so far
                part = self._full_path(integrity_part_name(self._rank))
                self._write_file(part, self._integrity.to_bytes())

    def _write_file(self, path: str, buf: bytes | memoryview) -> None:
        if not self._local:
            # Object stores and memory:// keep the bytes: hand over a copy, never a view
            # into a staging buffer torchsnapshot may reuse.
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

    def _commit(self, metadata: bytes) -> None:
        events.emit(events.SAVE_DATA_WRITTEN, path=self.url)
        parts = self._merge_rank_parts(metadata)
        self._check_files_still_there()
        # The sidecar is data as far as durability goes: written (and fsynced) before the
        # marker, so a committed checkpoint always has the sidecar it was written with.
        self._write_file(self._full_path(INTEGRITY_SIDECAR), self._integrity.to_bytes())
        events.emit(events.SAVE_SIDECAR_WRITTEN, path=self.url)
        for part in parts:  # merged into the sidecar: not left beside it
            self.fs.rm_file(part)
        self.before_marker()  # the run lost its writer lock: no commit
        replace_file(self.fs, self._full_path(COMMIT_MARKER), metadata)
        if self._local:
            # Make the new directory entries durable, deepest first, up to save_dir.
            for directory in sorted(self._created_dirs, key=len, reverse=True):
                fsync_directory(directory)
            fsync_directory(os.path.dirname(self.root) or ".")
        self._remove_claim()
        events.emit(events.SAVE_COMMITTED, path=self.url)

    def _assert_lock_held(self) -> None:
        assert_holding(self.fs.unstrip_protocol(os.path.dirname(self.root)))

    def _merge_rank_parts(self, metadata: bytes) -> list[str]:
        """Take the other ranks' sidecar records into this (rank 0's) sidecar; their paths.

        A rank that wrote no data file has no part. A part that cannot be parsed fails the
        commit: the sidecar would otherwise silently cover less than the checkpoint.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return []  # one process: nothing to merge, and no manifest to parse
        world_size = SnapshotMetadata.from_yaml(metadata.decode()).world_size
        found: list[str] = []
        for rank in range(1, world_size):
            path = self._full_path(integrity_part_name(rank))
            try:
                raw = self.fs.cat_file(path)
            except FileNotFoundError:
                continue
            try:
                self._integrity.merge(parse_sidecar(raw))
            except SidecarFormatError as error:
                raise CheckpointWriteError(
                    f"rank {rank}'s integrity records for {self.url} are unreadable ({error}); "
                    "nothing was committed"
                ) from error
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
            self.fs.rm_file(self._full_path(SAVE_CLAIM))
        except FileNotFoundError:
            return
        if self._local:
            fsync_directory(self.root)

    # -- reading ---------------------------------------------------------------------------

    def _read(self, read_io: ReadIO) -> None:
        path = self._full_path(read_io.path)
        sidecar = self._load_sidecar() if self.verify_reads else None
        record = sidecar.files.get(read_io.path.lstrip("/")) if sidecar else None
        with reading(f"{read_io.path} of checkpoint {self.url}"):
            if sidecar is None or record is None:
                start, end = read_io.byte_range or (None, None)
                read_io.buf = io.BytesIO(self.fs.cat_file(path, start=start, end=end))
                return
            start, end = read_io.byte_range or (0, record.size)
            first, last = (
                record.blocks_for(start, end, sidecar.block_size) if record.blocks else (start, end)
            )
            data = self.fs.cat_file(path, start=first, end=last)
        problem = sidecar.mismatch(read_io.path.lstrip("/"), first, data)
        if problem is None and len(data) < end - first:
            problem = f"{len(data)} bytes where {end - first} were recorded (truncated)"
        if problem is not None:
            raise corrupt_checkpoint(self.url, read_io.path, problem, kind="data")
        if (first, last) == (start, end):
            read_io.buf = io.BytesIO(data)  # shares ``data``: no copy
        else:
            read_io.buf = _SliceIO(memoryview(data)[start - first : end - first])

    def _load_sidecar(self) -> Sidecar | None:
        """The checkpoint's sidecar, read once per plugin (None: nothing to verify against)."""
        with self._sidecar_lock:
            if not self._sidecar_loaded:
                try:
                    with reading(f"{INTEGRITY_SIDECAR} of checkpoint {self.url}"):
                        raw = self.fs.cat_file(self._full_path(INTEGRITY_SIDECAR))
                    self._sidecar = parse_sidecar(raw)
                except FileNotFoundError:
                    self._sidecar = None
                except SidecarFormatError as error:
                    raise corrupt_checkpoint(
                        self.url, INTEGRITY_SIDECAR, str(error), kind="sidecar"
                    ) from error
                self._sidecar_loaded = True
            return self._sidecar


class _SliceIO(io.BytesIO):
    """The part of a block-aligned read that was asked for, without copying it.

    torchsnapshot only calls ``getvalue()`` on a read buffer and consumes the result as a
    buffer (``len``, slicing, ``frombuffer``), so a memoryview serves it as well as bytes.
    """

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view = view

    def getvalue(self) -> Any:
        return self._view
