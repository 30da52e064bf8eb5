"""The integrity sidecar ``<checkpoint>/.integrity.json``: what each data file must contain.

Why blocks: a restore reads byte *ranges* of files (torchsnapshot packs small tensors into
slabs and restores one state key at a time), so a single whole-file checksum could only be
checked by reading whole files again. The sidecar records an ``xxh3_64`` per fixed-size block
(1 MiB) instead; a reader expands each range to block boundaries, hashes what passes through
memory anyway and so verifies every byte it restores, for at most two extra blocks per read.
Hashing runs at ~10 GB/s here, an order of magnitude faster than the storage it guards::

    {"version": 2, "algorithm": "xxh3_64", "block_size": 1048576,
     "files": {"0/model/weight": {"size": n, "blocks": ["<hex>", ...]}}}

Version 1 sidecars (one ``xxh3_64`` per file) are still read: their files are verified when
read whole, and by ``verify_checkpoint(level="full")``.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import xxhash

from .layout import INTEGRITY_SIDECAR, is_data_file

ALGORITHM = "xxh3_64"
VERSION = 2
BLOCK_SIZE = 1024 * 1024
#: The versions :func:`parse_sidecar` reads (1: one checksum per file; 2: per block).
KNOWN_VERSIONS = (1, 2)
#: The largest block size a sidecar may name: readers allocate a buffer of at least one block,
#: so an absurd one (a garbled ``2**62``) must be refused, not allocated. 64x what is written.
MAX_BLOCK_SIZE = 64 * BLOCK_SIZE
_DIGEST = re.compile(r"[0-9a-f]{16}")  # xxh3_64, as xxhash spells it: 16 lowercase hex digits

Buffer = bytes | bytearray | memoryview

#: Why a data file the manifest names but the sidecar has no record of is corrupt: a sidecar
#: that covers less than the checkpoint would vouch for bytes it never saw (one emptied to
#: ``"files": {}`` would pass a flipped byte anywhere).
UNCOVERED = f"not covered by the integrity sidecar {INTEGRITY_SIDECAR} (nothing vouches for it)"


def checksum(data: Buffer) -> str:
    """The hex ``xxh3_64`` of a buffer (no copy of ``data`` is made)."""
    return xxhash.xxh3_64_hexdigest(data)


def block_checksums(data: Buffer, block_size: int = BLOCK_SIZE) -> list[str]:
    """``xxh3_64`` of each ``block_size`` block of ``data`` (the last one may be shorter)."""
    view = memoryview(data).cast("B")
    if view.nbytes == 0:
        return [checksum(b"")]
    return [checksum(view[i : i + block_size]) for i in range(0, view.nbytes, block_size)]


class SidecarFormatError(ValueError):
    """The sidecar's bytes were read but do not describe a file table (corrupt sidecar)."""


@dataclass(frozen=True)
class FileRecord:
    """What one data file must be: its size and either block checksums (v2) or one (v1)."""

    size: int
    blocks: tuple[str, ...] = ()
    whole: str = ""  # v1: checksum of the whole file

    def blocks_for(self, start: int, end: int, block_size: int) -> tuple[int, int]:
        """Block-aligned ``(first byte, end byte)`` covering ``[start, end)``."""
        first = (start // block_size) * block_size
        last = min(self.size, -(-end // block_size) * block_size)
        return first, last


@dataclass(frozen=True)
class Sidecar:
    """A parsed sidecar."""

    files: Mapping[str, FileRecord]
    block_size: int = BLOCK_SIZE
    version: int = VERSION

    def mismatch(self, relative: str, start: int, data: Buffer) -> str | None:
        """Why ``data`` read from ``relative`` at byte ``start`` is wrong, or ``None``.

        ``data`` must be block-aligned (as :meth:`FileRecord.blocks_for` gives) unless it is
        the whole file. Ranges that a v1 sidecar cannot check pass (sizes were checked); a
        file the sidecar does not cover never passes (:data:`UNCOVERED`).
        """
        record = self.files.get(relative)
        if record is None:
            return UNCOVERED
        view = memoryview(data).cast("B")
        if record.blocks:
            if start % self.block_size:
                raise ValueError(f"read of {relative} at {start} is not block-aligned")
            first_block = start // self.block_size
            for index, digest in enumerate(block_checksums(view, self.block_size)):
                block = first_block + index
                if block >= len(record.blocks):
                    return f"{view.nbytes} bytes read at {start}, file recorded {record.size}"
                if digest != record.blocks[block]:
                    offset = block * self.block_size
                    return (
                        f"{ALGORITHM} of bytes {offset}-"
                        f"{min(offset + self.block_size, record.size)} is {digest}, recorded "
                        f"{record.blocks[block]} (bytes changed)"
                    )
            return None
        if start == 0 and view.nbytes == record.size and record.whole:
            digest = checksum(view)
            if digest != record.whole:
                return f"{ALGORITHM} {digest}, recorded {record.whole} (bytes changed)"
        return None


def parse_sidecar(raw: bytes) -> Sidecar:
    """Parse sidecar bytes; :class:`SidecarFormatError` names the field that is wrong.

    Every field is checked before anything relies on it: a sidecar is read from storage, so a
    garbled one (a bad version, a block size of 0 or 2**62, a digest that is not one, a block
    count that does not fit the size) must make the checkpoint corrupt, never raise a raw
    ``ValueError`` or size an allocation.
    """
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise SidecarFormatError(f"not JSON ({error})") from error
    if not isinstance(body, dict):
        raise SidecarFormatError(f"a JSON {type(body).__name__}, not an object")
    version = _version(body)
    if body.get("algorithm") != ALGORITHM:
        algorithm = body.get("algorithm")
        raise SidecarFormatError(f"unknown algorithm {algorithm!r} (expected {ALGORITHM})")
    table = body.get("files")
    if not isinstance(table, dict):
        raise SidecarFormatError("no file table (files is not an object)")
    block_size = _block_size(body, version)
    files: dict[str, FileRecord] = {}
    for name, entry in table.items():
        files[str(name)] = _parse_record(str(name), entry, version, block_size)
    return Sidecar(files=files, block_size=block_size, version=version)


def _version(body: dict[str, Any]) -> int:
    version = body.get("version")
    if isinstance(version, bool) or version not in KNOWN_VERSIONS:
        known = " or ".join(str(v) for v in KNOWN_VERSIONS)
        raise SidecarFormatError(f"version {version!r} is not one this library reads ({known})")
    return int(version)


def _block_size(body: dict[str, Any], version: int) -> int:
    """The block size, within ``1..MAX_BLOCK_SIZE`` (v1 has none: its files are whole)."""
    if version == 1 and "block_size" not in body:
        return BLOCK_SIZE
    block_size = body.get("block_size")
    if (
        isinstance(block_size, bool)
        or not isinstance(block_size, int)
        or not 0 < block_size <= MAX_BLOCK_SIZE
    ):
        raise SidecarFormatError(
            f"block_size {block_size!r} is not a block size (an integer from 1 to "
            f"{MAX_BLOCK_SIZE}; this library writes {BLOCK_SIZE})"
        )
    return block_size


def _parse_record(name: str, entry: Any, version: int, block_size: int) -> FileRecord:
    if not isinstance(entry, dict):
        raise SidecarFormatError(f"entry of {name} is not an object")
    size = entry.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise SidecarFormatError(f"size of {name} is {size!r}, not a byte count")
    blocks = entry.get("blocks", [])
    whole = entry.get(ALGORITHM, "")
    if not isinstance(blocks, list) or not all(_is_digest(b) for b in blocks):
        raise SidecarFormatError(f"blocks of {name} are not a list of {ALGORITHM} checksums")
    if not isinstance(whole, str) or (whole and not _is_digest(whole)):
        raise SidecarFormatError(f"{ALGORITHM} of {name} is not a checksum")
    if version >= 2 and not blocks:
        raise SidecarFormatError(f"blocks of {name} are missing (a version {version} sidecar)")
    if not blocks and not whole:
        raise SidecarFormatError(f"{name} has no checksum")
    expected = max(1, -(-size // block_size))
    if blocks and len(blocks) != expected:
        raise SidecarFormatError(
            f"blocks of {name}: {len(blocks)} checksums for {size} bytes in {block_size}-byte "
            f"blocks ({expected} expected)"
        )
    return FileRecord(size=size, blocks=tuple(blocks), whole=whole)


def _is_digest(value: Any) -> bool:
    return isinstance(value, str) and _DIGEST.fullmatch(value) is not None


class SidecarRecorder:
    """Collects the record of each data file a storage plugin writes; thread-safe.

    torchsnapshot's writer runs several writes concurrently in worker threads.
    """

    def __init__(self, block_size: int = BLOCK_SIZE) -> None:
        self.block_size = block_size
        self._files: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def record(self, relative: str, data: Buffer) -> None:
        if not is_data_file(relative):
            return
        entry = {
            "size": memoryview(data).nbytes,
            "blocks": block_checksums(data, self.block_size),
        }
        with self._lock:
            self._files[relative.lstrip("/")] = entry

    def forget(self, relative: str) -> None:
        with self._lock:
            self._files.pop(relative.lstrip("/"), None)

    def sizes(self) -> dict[str, int]:
        """``{relative path: size}`` of every file recorded so far."""
        with self._lock:
            return {name: int(entry["size"]) for name, entry in self._files.items()}

    def merge(self, sidecar: Sidecar) -> None:
        """Add another writer's records (another rank's part of the same checkpoint)."""
        with self._lock:
            for name, record in sidecar.files.items():
                self._files[name] = {"size": record.size, "blocks": list(record.blocks)}

    def to_bytes(self) -> bytes:
        with self._lock:
            files = dict(sorted(self._files.items()))
        body = {
            "version": VERSION,
            "algorithm": ALGORITHM,
            "block_size": self.block_size,
            "files": files,
        }
        return json.dumps(body, separators=(",", ":")).encode()
