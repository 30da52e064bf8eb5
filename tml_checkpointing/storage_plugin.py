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

Integrity: each data file's size and ``xxh3_64`` are recorded as it is written (on the buffer,
in the writer thread) and stored as ``.integrity.json`` just before the marker, as durably as
the data (see :mod:`tml_checkpointing.integrity`).
"""

from __future__ import annotations

import asyncio
import io
import os
from typing import Any

from torchsnapshot.io_types import ReadIO, StoragePlugin, WriteIO
from torchsnapshot.snapshot import SNAPSHOT_METADATA_FNAME

from .filesystem import StorageOptions, fsync_directory, is_local, replace_file, resolve
from .integrity import INTEGRITY_FNAME, IntegrityRecorder

TRANSPORT_SCHEME = "tml-fsspec"


def transport_url(url: str) -> str:
    """The URL torchsnapshot is given so that it routes I/O through :class:`FsspecStoragePlugin`."""
    return f"{TRANSPORT_SCHEME}://{url}"


def fsspec_storage_plugin(path: str, storage_options: dict[str, Any] | None) -> StoragePlugin:
    """Factory registered under the ``storage_plugins`` entry-point group."""
    return FsspecStoragePlugin(path, storage_options)


class FsspecStoragePlugin(StoragePlugin):
    """Reads and writes one snapshot directory through an fsspec filesystem."""

    def __init__(self, root: str, storage_options: StorageOptions | None = None) -> None:
        self.fs, self.root = resolve(root, storage_options)
        self.root = self.root.rstrip("/")
        self._local = is_local(self.fs)
        self._created_dirs: set[str] = set()
        self._integrity = IntegrityRecorder()

    def _full_path(self, relative: str) -> str:
        return f"{self.root}/{relative.lstrip('/')}"

    async def write(self, write_io: WriteIO) -> None:
        if write_io.path == SNAPSHOT_METADATA_FNAME:
            await asyncio.to_thread(self._commit, bytes(write_io.buf))
        else:
            await asyncio.to_thread(self._write_data, write_io.path, write_io.buf)

    async def read(self, read_io: ReadIO) -> None:
        path = self._full_path(read_io.path)
        start, end = read_io.byte_range if read_io.byte_range is not None else (None, None)
        data = await asyncio.to_thread(self.fs.cat_file, path, start=start, end=end)
        read_io.buf = io.BytesIO(data)

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

    def _write_file(self, path: str, buf: bytes | memoryview) -> None:
        if not self._local:
            # Object stores and memory:// keep the bytes: hand over a copy, never a view
            # into a staging buffer torchsnapshot may reuse.
            self.fs.pipe_file(path, bytes(buf))
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
        # The sidecar is data as far as durability goes: written (and fsynced) before the
        # marker, so a committed checkpoint always has the sidecar it was written with.
        self._write_file(self._full_path(INTEGRITY_FNAME), self._integrity.sidecar_bytes())
        replace_file(self.fs, self._full_path(SNAPSHOT_METADATA_FNAME), metadata)
        if not self._local:
            return
        # Make the new directory entries durable, deepest first, up to save_dir.
        for directory in sorted(self._created_dirs, key=len, reverse=True):
            fsync_directory(directory)
        fsync_directory(os.path.dirname(self.root) or ".")
