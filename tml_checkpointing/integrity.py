"""Checkpoint integrity: a sidecar of sizes and checksums, its verification, and safe resume.

Why: a commit marker proves the writer *finished*, not that the bytes are still the ones it
wrote. Disks rot, copies get truncated, a ``cp -r`` half-fails. So at commit the storage
plugin writes ``<checkpoint>/.integrity.json`` **before** the marker, recording every data file
it wrote with its size and an ``xxh3_64`` checksum (computed on the in-memory buffer, ~10+ GB/s,
so saving barely notices)::

    {"version": 1, "algorithm": "xxh3_64", "files": {"0/model/weight": {"size": n, "xxh3_64": hex}}}

:func:`verify_checkpoint` then checks, cheapest first:

* the marker parses as torchsnapshot metadata (a truncated or garbage marker is *corrupt*);
* every file the torchsnapshot manifest names exists (and is long enough for its byte range);
* with a sidecar: each recorded file's size, from one listing of the checkpoint (one ``find``,
  not a request per file, on object stores); with ``level="full"`` each checksum too, streamed
  in chunks so a 1 GB shard never sits in memory at once.

Checkpoints without a sidecar (written by plain torchsnapshot or before this existed) are
*unverified*, not corrupt: they still get the marker and manifest checks.

Not covered by the sidecar, on purpose: the marker itself, the sidecar, and what evaluators add
after commit (``evaled_by/``, ``metrics.json``, ``eval/``). Known limitation: in a multi-rank
save only rank 0 commits, so the sidecar covers the files rank 0's process wrote; other ranks'
files are covered by the manifest existence check only.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import xxhash
from torchsnapshot.manifest import SnapshotMetadata
from torchsnapshot.snapshot import SNAPSHOT_METADATA_FNAME

from .discovery import list_checkpoints
from .errors import CheckpointNotFoundError, CorruptCheckpointError
from .evaluation import EVALUATED_BY, METRICS_FNAME, PARTITION_METRICS_DIR
from .filesystem import StorageOptions, invalidate_listing, resolve

logger = logging.getLogger(__name__)

INTEGRITY_FNAME = ".integrity.json"
ALGORITHM = "xxh3_64"
SIDECAR_VERSION = 1
_CHUNK = 8 * 1024 * 1024

VerifyLevel = Literal["none", "size", "full"]
VERIFY_LEVELS: tuple[str, ...] = ("none", "size", "full")
Status = Literal["valid", "unverified", "corrupt"]


def checksum(data: bytes | bytearray | memoryview) -> str:
    """The hex ``xxh3_64`` of a buffer (no copy of ``data`` is made)."""
    return xxhash.xxh3_64_hexdigest(data)


def is_covered(relative: str) -> bool:
    """Whether a file inside a checkpoint belongs in its sidecar.

    Files added after commit (evaluator markers, metrics) and the commit files themselves
    (marker, its temporary name, the sidecar) are not data.
    """
    name = relative.lstrip("/")
    return not (
        name in (SNAPSHOT_METADATA_FNAME, INTEGRITY_FNAME, METRICS_FNAME)
        or name.startswith(f"{SNAPSHOT_METADATA_FNAME}.")
        or name.startswith(f"{EVALUATED_BY}/")
        or name.startswith(f"{PARTITION_METRICS_DIR}/")
    )


class IntegrityRecorder:
    """Collects (size, checksum) of each file a storage plugin writes; thread-safe.

    torchsnapshot's writer runs several writes concurrently in worker threads.
    """

    def __init__(self) -> None:
        self._files: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def record(self, relative: str, data: bytes | bytearray | memoryview) -> None:
        if not is_covered(relative):
            return
        entry = {"size": memoryview(data).nbytes, ALGORITHM: checksum(data)}
        with self._lock:
            self._files[relative.lstrip("/")] = entry

    def forget(self, relative: str) -> None:
        with self._lock:
            self._files.pop(relative.lstrip("/"), None)

    def sidecar_bytes(self) -> bytes:
        with self._lock:
            files = dict(sorted(self._files.items()))
        body = {"version": SIDECAR_VERSION, "algorithm": ALGORITHM, "files": files}
        return json.dumps(body, indent=1).encode()


@dataclass(frozen=True)
class FileProblem:
    """One thing wrong with one file of a checkpoint."""

    path: str  # relative to the checkpoint
    problem: str

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
        raise CorruptCheckpointError(
            f"checkpoint {self.checkpoint} is corrupt: {first.path}: {first.problem}{more}. "
            "Do not restore from it; resume from an older checkpoint with "
            "get_latest_valid_checkpoint(save_dir).",
            checkpoint=self.checkpoint,
            path=first.path,
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


def verify_checkpoint(
    checkpoint: str,
    *,
    level: VerifyLevel = "size",
    storage_options: StorageOptions | None = None,
    raise_on_corrupt: bool = True,
    progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Check a committed checkpoint against its marker, manifest and integrity sidecar.

    ``level="size"`` costs one listing and two small reads; ``level="full"`` also reads every
    recorded file once (streamed) to compare checksums, calling ``progress(n_bytes)`` as it
    goes. Raises :class:`CorruptCheckpointError` naming the first bad file (unless
    ``raise_on_corrupt=False``, then the report says ``corrupt``), and
    :class:`CheckpointNotFoundError` when ``checkpoint`` has no commit marker at all.
    """
    if level not in VERIFY_LEVELS:
        raise ValueError(f"verify level must be one of {VERIFY_LEVELS}, got {level!r}")
    started = time.monotonic()
    report = VerifyReport(checkpoint=checkpoint, level=level)
    fs, root = resolve(checkpoint, storage_options)
    root = root.rstrip("/")
    listing = _listing(fs, root)
    report.total_bytes = sum(info["size"] for info in listing.values())
    report.newest_mtime = max(
        (info["mtime"] for info in listing.values() if info["mtime"]), default=None
    )
    if listing.get(SNAPSHOT_METADATA_FNAME, {}).get("size", 0) <= 0:
        raise CheckpointNotFoundError(
            f"{checkpoint} is not a committed checkpoint (no non-empty {SNAPSHOT_METADATA_FNAME}"
            "); it may be incomplete (still being written, or its writer crashed)"
        )
    if level == "none":
        report.status = "unverified"
        return _finish(report, started, raise_on_corrupt)

    metadata = _read_metadata(fs, root, report)
    if metadata is not None:
        for location, end in _manifest_locations(metadata):
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

    sidecar = _read_sidecar(fs, root, listing, report)
    if sidecar is None:
        if report.status != "corrupt":
            report.status = "unverified"
        return _finish(report, started, raise_on_corrupt)

    to_hash: list[tuple[str, int, str]] = []
    for relative, recorded in sidecar.items():
        size = int(recorded.get("size", -1))
        report.files_checked += 1
        if relative not in listing:
            report.problems.append(FileProblem(relative, "missing (recorded in the sidecar)"))
            continue
        actual = listing[relative]["size"]
        if actual != size:
            what = "truncated" if actual < size else "longer than written"
            report.problems.append(
                FileProblem(relative, f"size {actual} bytes, recorded {size} ({what})")
            )
            continue
        if level == "full":
            to_hash.append((relative, size, str(recorded.get(ALGORITHM, ""))))
    for relative, _size, expected in to_hash:
        actual_sum, n_bytes = _stream_checksum(fs, f"{root}/{relative}", progress)
        report.bytes_checked += n_bytes
        if actual_sum != expected:
            report.problems.append(
                FileProblem(
                    relative, f"{ALGORITHM} {actual_sum}, recorded {expected} (bytes changed)"
                )
            )
    if report.problems:
        report.status = "corrupt"
    return _finish(report, started, raise_on_corrupt)


def _finish(report: VerifyReport, started: float, raise_on_corrupt: bool) -> VerifyReport:
    if report.problems:
        report.status = "corrupt"
    report.seconds = time.monotonic() - started
    if raise_on_corrupt:
        report.raise_if_corrupt()
    return report


def _listing(fs: Any, root: str) -> dict[str, dict[str, Any]]:
    """``{relative path: {size, mtime}}`` of every file under ``root``, in one listing."""
    invalidate_listing(fs, root)
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        found = {}
    prefix = f"{root}/"
    listing: dict[str, dict[str, Any]] = {}
    for key, info in found.items():
        key = key.rstrip("/")
        if not key.startswith(prefix) or info.get("type") == "directory":
            continue
        listing[key[len(prefix) :]] = {"size": int(info.get("size") or 0), "mtime": mtime_of(info)}
    return listing


def mtime_of(info: dict[str, Any]) -> float | None:
    """Modification time (epoch seconds) from an fsspec ``info`` dict of any backend."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        try:
            return float(value)
        except (TypeError, ValueError):
            continue
    return None


def _read_metadata(fs: Any, root: str, report: VerifyReport) -> SnapshotMetadata | None:
    try:
        text = fs.cat_file(f"{root}/{SNAPSHOT_METADATA_FNAME}").decode()
        metadata = SnapshotMetadata.from_yaml(text)
        if not isinstance(metadata.manifest, dict):
            raise TypeError("manifest is not a mapping")
        return metadata
    except Exception as error:  # any parse failure means the marker is unusable
        report.problems.append(
            FileProblem(
                SNAPSHOT_METADATA_FNAME,
                f"commit marker unreadable as torchsnapshot metadata "
                f"({type(error).__name__}: {str(error)[:120]})",
            )
        )
        return None


def _read_sidecar(
    fs: Any, root: str, listing: dict[str, dict[str, Any]], report: VerifyReport
) -> dict[str, dict[str, Any]] | None:
    if INTEGRITY_FNAME not in listing:
        return None
    try:
        body = json.loads(fs.cat_file(f"{root}/{INTEGRITY_FNAME}"))
        if body.get("algorithm") != ALGORITHM or not isinstance(body.get("files"), dict):
            raise ValueError(f"unknown algorithm {body.get('algorithm')!r} or no file table")
        return body["files"]
    except Exception as error:
        report.problems.append(
            FileProblem(INTEGRITY_FNAME, f"integrity sidecar unreadable ({error})")
        )
        return None


def _manifest_locations(metadata: SnapshotMetadata) -> Iterator[tuple[str, int | None]]:
    """``(file, last byte read or None)`` for every file the manifest points into."""

    def walk(entry: Any) -> Iterator[tuple[str, int | None]]:
        location = getattr(entry, "location", None)
        if isinstance(location, str):
            byte_range = getattr(entry, "byte_range", None)
            yield location, (int(byte_range[1]) if byte_range else None)
        for nested in ("shards", "chunks"):
            for shard in getattr(entry, nested, None) or []:
                tensor = getattr(shard, "tensor", None)
                if tensor is not None:
                    yield from walk(tensor)

    ends: dict[str, int | None] = {}
    for entry in metadata.manifest.values():
        for location, end in walk(entry):
            previous = ends.get(location)
            ends[location] = end if previous is None else max(previous, end or 0)
    yield from ends.items()


def _stream_checksum(fs: Any, path: str, progress: Callable[[int], None] | None) -> tuple[str, int]:
    hasher = xxhash.xxh3_64()
    total = 0
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            hasher.update(chunk)
            total += len(chunk)
            if progress is not None:
                progress(len(chunk))
    return hasher.hexdigest(), total


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
    Nothing is deleted. None usable: ``""`` if ``missing_ok`` else
    :class:`CheckpointNotFoundError`.
    """
    if verify not in VERIFY_LEVELS:
        raise ValueError(f"verify must be one of {VERIFY_LEVELS}, got {verify!r}")
    skipped: list[str] = []
    for candidate in reversed(list_checkpoints(save_dir, storage_options)):
        try:
            verify_checkpoint(candidate.path, level=verify, storage_options=storage_options)
        except CorruptCheckpointError as error:
            logger.warning("Skipping checkpoint %s for resume: %s", candidate.path, error)
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
