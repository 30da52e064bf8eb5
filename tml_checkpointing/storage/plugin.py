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
the file, and so does a read of a data file the sidecar has no record of
(``storage_options={"tml_verify_reads": False}`` turns that off).

A save whose files disappear before commit (removed by hand or by a cleanup racing it) fails
instead of committing: the files recorded are checked against one listing right before the
marker is written.

The writing and the commit protocol are
:class:`~tml_checkpointing.storage.checkpoint_files.CheckpointFiles` (no torch, so that the
writer process runs them without importing it); this plugin hands it the rank and a marker
parser, and does the reading itself.
"""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
from torchsnapshot.io_types import ReadIO, StoragePlugin, WriteIO
from torchsnapshot.manifest import SnapshotMetadata

from ..errors import corrupt_checkpoint
from ..format.layout import COMMIT_MARKER, INTEGRITY_SIDECAR, is_data_file
from ..format.sidecar import UNCOVERED, Sidecar, SidecarFormatError, parse_sidecar
from .checkpoint_files import CheckpointFiles, world_size_from_json
from .faults import reading
from .filesystem import StorageOptions

TRANSPORT_SCHEME = "tml-fsspec"
VERIFY_READS_OPTION = "tml_verify_reads"  # storage option read by this plugin, not the backend


def transport_url(url: str) -> str:
    """The URL torchsnapshot is given so that it routes I/O through :class:`FsspecStoragePlugin`."""
    return f"{TRANSPORT_SCHEME}://{url}"


def fsspec_storage_plugin(path: str, storage_options: dict[str, Any] | None) -> StoragePlugin:
    """Factory registered under the ``storage_plugins`` entry-point group."""
    return FsspecStoragePlugin(path, storage_options)


def world_size_of_marker(metadata: bytes) -> int:
    """The world size a marker names: parsed as JSON (how torchsnapshot writes it), as YAML
    only if that fails (a marker written by hand, or by another writer)."""
    try:
        return world_size_from_json(metadata)
    except (ValueError, KeyError, TypeError):
        return int(SnapshotMetadata.from_yaml(metadata.decode()).world_size)


class FsspecStoragePlugin(StoragePlugin):
    """Reads and writes one snapshot directory through an fsspec filesystem.

    Writing and the commit are :class:`~tml_checkpointing.storage.checkpoint_files.CheckpointFiles`
    (``files``), free of torch so that the writer process runs them without importing it;
    this class adds what only torch knows (the rank) and torchsnapshot's interface.
    """

    def __init__(self, root: str, storage_options: StorageOptions | None = None) -> None:
        options = dict(storage_options or {})
        self.verify_reads = bool(options.pop(VERIFY_READS_OPTION, True))
        distributed = dist.is_available() and dist.is_initialized()
        self.files = CheckpointFiles(
            root,
            options,
            rank=dist.get_rank() if distributed else 0,
            world_size_of=world_size_of_marker if distributed else None,
        )
        self.url = root
        self.fs, self.root = self.files.fs, self.files.root
        self._sidecar: Sidecar | None = None
        self._sidecar_loaded = False
        self._sidecar_lock = threading.Lock()

    @property
    def before_marker(self) -> Callable[[], None]:
        """The last check before the marker (by default: this process holds the lock)."""
        return self.files.before_marker

    @before_marker.setter
    def before_marker(self, check: Callable[[], None]) -> None:
        self.files.before_marker = check

    def _full_path(self, relative: str) -> str:
        return self.files.full_path(relative)

    async def write(self, write_io: WriteIO) -> None:
        if write_io.path == COMMIT_MARKER:
            await asyncio.to_thread(self._commit, bytes(write_io.buf))
        else:
            await asyncio.to_thread(self._write_data, write_io.path, write_io.buf)

    async def read(self, read_io: ReadIO) -> None:
        await asyncio.to_thread(self._read, read_io)

    async def delete(self, path: str) -> None:
        self.files.forget(path)
        await asyncio.to_thread(self.fs.rm_file, self._full_path(path))

    async def close(self) -> None:
        return None

    # -- writing (see CheckpointFiles) ------------------------------------------------------

    def _write_data(self, relative: str, buf: bytes | memoryview) -> None:
        self.files.write_data(relative, buf)

    def _commit(self, metadata: bytes) -> None:
        self.files.commit(metadata)

    # -- reading ---------------------------------------------------------------------------

    def _read(self, read_io: ReadIO) -> None:
        path = self._full_path(read_io.path)
        sidecar = self._load_sidecar() if self.verify_reads else None
        relative = read_io.path.lstrip("/")
        record = sidecar.files.get(relative) if sidecar else None
        if sidecar is not None and record is None and is_data_file(relative):
            raise corrupt_checkpoint(self.url, relative, UNCOVERED, kind="data")
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
