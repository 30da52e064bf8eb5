"""Checkpoint verification, and picking the newest checkpoint that verifies.

Why: a commit marker proves the writer *finished*, not that the bytes are still the ones it
wrote. Disks rot, copies get truncated, a ``cp -r`` half-fails. The storage plugin records
every data file's size and block checksums in the sidecar (:mod:`tml_checkpointing.format.sidecar`)
before the marker; :func:`verify_checkpoint` checks, cheapest first:

* the marker parses as torchsnapshot metadata (a truncated or garbage marker is *corrupt*);
* every file the torchsnapshot manifest names exists (and is long enough for its byte range);
* with a sidecar: every file the manifest names has a record in it (a sidecar that covers
  nothing vouches for nothing); each recorded file's size, from one listing of the checkpoint
  (one ``find``, not a request per file, on object stores); with ``level="full"`` every
  checksum too, streamed so a 1 GB shard never sits in memory at once.

Unreadable is not corrupt: a checkpoint is *corrupt* only when bytes were read and are wrong
(size, checksum, unparsable content). A failure to read (permission denied, connection reset,
timeout) raises :class:`~tml_checkpointing.errors.CheckpointReadError` and never makes a caller
skip, move aside or delete anything. Checkpoints without a sidecar (plain torchsnapshot, or
written before it existed) are *unverified*, not corrupt.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import xxhash
from fsspec import AbstractFileSystem
from torchsnapshot.manifest import SnapshotMetadata

from .. import events
from ..catalog.discovery import newest_first
from ..errors import (
    BrokenChainError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    CorruptionKind,
    InvalidArgumentError,
    corrupt_checkpoint,
)
from ..format.layout import COMMIT_MARKER, INTEGRITY_SIDECAR, is_data_file, marker_commits
from ..format.markers import manifest_locations
from ..format.sidecar import ALGORITHM, UNCOVERED, Sidecar, SidecarFormatError
from ..storage.faults import reading
from ..storage.filesystem import StorageOptions, find_tree, invalidate_listing, mtime_of, resolve
from .chains import ancestry
from .metadata import read_metadata, read_sidecar

logger = logging.getLogger(__name__)

_CHUNK = 8 * 1024 * 1024

VerifyLevel = Literal["none", "size", "full"]
VERIFY_LEVELS: tuple[str, ...] = ("none", "size", "full")
Status = Literal["valid", "unverified", "corrupt"]


@dataclass(frozen=True)
class FileProblem:
    """One thing wrong with one file of a checkpoint."""

    path: str  # relative to the checkpoint
    problem: str
    kind: CorruptionKind = "data"

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


@dataclass
class VerifyReport:
    """What :func:`verify_checkpoint` found.

    ``status`` is ``valid`` (sidecar present, everything matched), ``unverified`` (no sidecar:
    only the marker and manifest could be checked, and they were fine) or ``corrupt``.
    """

    checkpoint: str
    level: str
    status: Status = "valid"
    problems: list[FileProblem] = field(default_factory=list)
    files_checked: int = 0
    bytes_checked: int = 0
    total_bytes: int = 0
    newest_mtime: float | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Usable for restore: valid or unverified."""
        return self.status != "corrupt"

    def summary(self) -> str:
        if self.status == "corrupt":
            return "; ".join(str(problem) for problem in self.problems)
        if self.status == "unverified":
            return "no integrity sidecar (older or plain torchsnapshot checkpoint)"
        return f"{self.files_checked} files verified ({self.level})"

    def raise_if_corrupt(self) -> None:
        if self.status != "corrupt":
            return
        first = self.problems[0]
        more = f" (and {len(self.problems) - 1} more problems)" if len(self.problems) > 1 else ""
        raise corrupt_checkpoint(
            self.checkpoint, first.path, f"{first.problem}{more}", kind=first.kind
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "level": self.level,
            "status": self.status,
            "problems": [{"path": p.path, "problem": p.problem} for p in self.problems],
            "files_checked": self.files_checked,
            "bytes_checked": self.bytes_checked,
            "total_bytes": self.total_bytes,
            "seconds": round(self.seconds, 6),
        }


def check_verify_level(level: object) -> VerifyLevel:
    """``level`` if it is one of :data:`VERIFY_LEVELS`, else :class:`InvalidArgumentError`."""
    if level not in VERIFY_LEVELS:
        raise InvalidArgumentError(f"verify level must be one of {VERIFY_LEVELS}, got {level!r}")
    return level  # type: ignore[return-value]


def verify_checkpoint(
    checkpoint: str,
    *,
    level: VerifyLevel = "size",
    storage_options: StorageOptions | None = None,
    raise_on_corrupt: bool = True,
    progress: Callable[[int], None] | None = None,
    follow_chain: bool = True,
) -> VerifyReport:
    """Check a committed checkpoint against its marker, manifest and integrity sidecar.

    ``level="size"`` costs one listing and two small reads; ``level="full"`` also reads every
    recorded file once (streamed) to compare checksums, calling ``progress(n_bytes)`` as it
    goes. Raises :class:`CorruptCheckpointError` naming the first bad file (unless
    ``raise_on_corrupt=False``, then the report says ``corrupt``),
    :class:`CheckpointNotFoundError` when ``checkpoint`` has no commit marker at all, and
    :class:`~tml_checkpointing.errors.CheckpointReadError` when storage cannot be read.

    A delta checkpoint (incremental saves) is valid only with its chain: every ancestor up to
    the chain's full checkpoint must be committed, be the very checkpoint it was computed
    against, and verify at the same level (``follow_chain=False`` checks its own files only).
    """
    check_verify_level(level)
    started = time.monotonic()
    report = VerifyReport(checkpoint=checkpoint, level=level)
    fs, root = resolve(checkpoint, storage_options)
    root = root.rstrip("/")
    listing = _listing(fs, root, checkpoint)
    report.total_bytes = sum(info["size"] for info in listing.values())
    report.newest_mtime = max(
        (info["mtime"] for info in listing.values() if info["mtime"]), default=None
    )
    if not marker_commits(listing.get(COMMIT_MARKER, {}).get("size")):
        raise CheckpointNotFoundError(
            f"{checkpoint} is not a committed checkpoint (no non-empty {COMMIT_MARKER}); it may "
            "be incomplete (still being written, or its writer crashed)"
        )
    if level == "none":
        report.status = "unverified"
        return _finish(report, started, raise_on_corrupt)

    metadata = _read_metadata(fs, root, checkpoint, report)
    locations: list[str] = []
    if metadata is not None:
        for location, end in manifest_locations(metadata):
            locations.append(location)
            if location not in listing:
                report.problems.append(
                    FileProblem(location, "missing (named by the torchsnapshot manifest)")
                )
            elif end is not None and listing[location]["size"] < end:
                report.problems.append(
                    FileProblem(
                        location,
                        f"{listing[location]['size']} bytes, but the manifest reads up to byte "
                        f"{end} (truncated)",
                    )
                )

    if metadata is not None and follow_chain:
        _check_chain(report, fs, root, checkpoint, metadata, level, storage_options, progress)

    sidecar = _read_sidecar(fs, root, checkpoint, listing, report)
    if sidecar is None:
        if not report.problems:
            report.status = "unverified"
        return _finish(report, started, raise_on_corrupt)

    _check_covered(report, sidecar, locations)
    to_hash: list[str] = []
    for relative, record in sidecar.files.items():
        report.files_checked += 1
        if relative not in listing:
            report.problems.append(FileProblem(relative, "missing (recorded in the sidecar)"))
            continue
        actual = listing[relative]["size"]
        if actual != record.size:
            what = "truncated" if actual < record.size else "longer than written"
            report.problems.append(
                FileProblem(relative, f"size {actual} bytes, recorded {record.size} ({what})")
            )
            continue
        if level == "full":
            to_hash.append(relative)
    for relative in to_hash:
        problem, n_bytes = _stream_verify(fs, root, relative, sidecar, progress)
        report.bytes_checked += n_bytes
        if problem:
            report.problems.append(FileProblem(relative, problem))
    return _finish(report, started, raise_on_corrupt)


def _check_covered(report: VerifyReport, sidecar: Sidecar, locations: list[str]) -> None:
    """Every data file the manifest names must have a sidecar record: one that has none
    could hold any bytes at all (a sidecar emptied to ``"files": {}`` vouched for a flipped
    byte), so it makes the checkpoint corrupt at every level, like a missing file."""
    reported = {problem.path for problem in report.problems}
    for location in locations:
        relative = location.lstrip("/")
        if is_data_file(relative) and relative not in sidecar.files and location not in reported:
            report.problems.append(FileProblem(relative, UNCOVERED))


def _check_chain(
    report: VerifyReport,
    fs: AbstractFileSystem,
    root: str,
    checkpoint: str,
    metadata: SnapshotMetadata,
    level: VerifyLevel,
    storage_options: StorageOptions | None,
    progress: Callable[[int], None] | None,
) -> None:
    """Problems of a delta checkpoint's chain, added to ``report`` (nothing for a full one)."""
    try:
        chain = ancestry(checkpoint, metadata, fs, root)
    except BrokenChainError as error:
        where = "" if error.at == checkpoint else f" at {error.at}"
        report.problems.append(
            FileProblem(COMMIT_MARKER, f"chain broken{where}: {error.problem}", "chain")
        )
        return
    except CorruptCheckpointError as error:  # its own link does not parse
        report.problems.append(
            FileProblem(error.path or COMMIT_MARKER, error.problem or str(error), "chain")
        )
        return
    for ancestor in chain[1:]:
        found = verify_checkpoint(
            ancestor.checkpoint,
            level=level,
            storage_options=storage_options,
            raise_on_corrupt=False,
            progress=progress,
            follow_chain=False,
        )
        report.bytes_checked += found.bytes_checked
        if found.status == "corrupt":
            report.problems.append(
                FileProblem(
                    COMMIT_MARKER,
                    f"chain: ancestor {ancestor.checkpoint} is corrupt ({found.summary()})",
                    "chain",
                )
            )


def _finish(report: VerifyReport, started: float, raise_on_corrupt: bool) -> VerifyReport:
    if report.problems:
        report.status = "corrupt"
    report.seconds = time.monotonic() - started
    if raise_on_corrupt:
        report.raise_if_corrupt()
    return report


def _listing(fs: AbstractFileSystem, root: str, checkpoint: str) -> dict[str, dict[str, Any]]:
    """``{relative path: {size, mtime}}`` of every file under ``root``, in one listing."""
    invalidate_listing(fs, root)
    with reading(f"the listing of checkpoint {checkpoint}"):
        found = find_tree(fs, root)
    prefix = f"{root}/"
    listing: dict[str, dict[str, Any]] = {}
    for key, info in found.items():
        key = key.rstrip("/")
        if not key.startswith(prefix) or info.get("type") == "directory":
            continue
        listing[key[len(prefix) :]] = {"size": int(info.get("size") or 0), "mtime": mtime_of(info)}
    return listing


def _read_metadata(
    fs: AbstractFileSystem, root: str, checkpoint: str, report: VerifyReport
) -> SnapshotMetadata | None:
    metadata, why = read_metadata(fs, root, checkpoint)
    if metadata is None:
        report.problems.append(
            FileProblem(
                COMMIT_MARKER,
                f"commit marker unreadable as torchsnapshot metadata ({why})",
                "marker",
            )
        )
    return metadata


def _read_sidecar(
    fs: AbstractFileSystem,
    root: str,
    checkpoint: str,
    listing: dict[str, dict[str, Any]],
    report: VerifyReport,
) -> Sidecar | None:
    if INTEGRITY_SIDECAR not in listing:
        return None
    try:
        return read_sidecar(fs, root, checkpoint)
    except SidecarFormatError as error:
        report.problems.append(
            FileProblem(INTEGRITY_SIDECAR, f"integrity sidecar unreadable ({error})", "sidecar")
        )
        return None


def _stream_verify(
    fs: AbstractFileSystem,
    root: str,
    relative: str,
    sidecar: Sidecar,
    progress: Callable[[int], None] | None,
) -> tuple[str | None, int]:
    """Read one file in block-sized pieces and compare; ``(problem or None, bytes read)``."""
    record = sidecar.files[relative]
    whole = xxhash.xxh3_64()
    total = 0
    chunk = max(sidecar.block_size, (_CHUNK // sidecar.block_size) * sidecar.block_size)
    problem: str | None = None
    with reading(f"{relative} of checkpoint {root}"), fs.open(f"{root}/{relative}", "rb") as handle:
        while data := handle.read(chunk):
            if record.blocks and problem is None:
                problem = sidecar.mismatch(relative, total, data)
            elif not record.blocks:
                whole.update(data)
            total += len(data)
            if progress is not None:
                progress(len(data))
    if not record.blocks and record.whole and whole.hexdigest() != record.whole:
        problem = f"{ALGORITHM} {whole.hexdigest()}, recorded {record.whole} (bytes changed)"
    return problem, total


def get_latest_valid_checkpoint(
    save_dir: str,
    *,
    verify: VerifyLevel = "size",
    storage_options: StorageOptions | None = None,
    missing_ok: bool = True,
) -> str:
    """The newest committed checkpoint under ``save_dir`` that verifies: what to resume from.

    Walks committed checkpoints newest first; each one skipped (corrupt, or its marker gone
    because it was pruned meanwhile) is logged as a WARNING naming it and the reason.
    Nothing is deleted. A storage fault is not a reason to skip: it raises
    :class:`~tml_checkpointing.errors.CheckpointReadError`, so a run never resumes from an
    older checkpoint just because a newer one could not be read. None usable: ``""`` if
    ``missing_ok`` else :class:`CheckpointNotFoundError`.
    """
    check_verify_level(verify)
    skipped: list[str] = []
    for candidate in newest_first(save_dir, storage_options):
        try:
            verify_checkpoint(candidate.path, level=verify, storage_options=storage_options)
        except CorruptCheckpointError as error:
            logger.warning("Skipping checkpoint %s for resume: %s", candidate.path, error)
            events.emit(events.CORRUPT_FOUND, path=candidate.path, error=str(error))
            skipped.append(f"{candidate.path} (corrupt)")
            continue
        except CheckpointNotFoundError as error:
            logger.warning("Skipping checkpoint %s for resume: %s", candidate.path, error)
            skipped.append(f"{candidate.path} (no longer committed)")
            continue
        if skipped:
            logger.warning(
                "Resuming from %s, older than %d skipped checkpoint(s): %s",
                candidate.path,
                len(skipped),
                ", ".join(skipped),
            )
        return candidate.path
    if missing_ok:
        if skipped:
            logger.warning("No valid checkpoint in %s; skipped: %s", save_dir, ", ".join(skipped))
        return ""
    detail = f"; skipped: {', '.join(skipped)}" if skipped else ""
    raise CheckpointNotFoundError(
        f"no valid committed checkpoint in {save_dir!r}{detail}; pass missing_ok=True to start "
        "from scratch"
    )
