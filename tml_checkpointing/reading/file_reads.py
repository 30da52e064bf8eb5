"""Reading byte ranges of one data file into tensors: sorted, coalesced, verified, copied.

Why: a restore wants many ranges of few files (one ``batched/`` file per saving rank; for a
sharded table, only the rows this rank holds). Each range as its own request (torchsnapshot's
way: a fresh buffer per read, a deserialisation, a copy) costs far more than the bytes. Here
the ranges of a file are sorted, widened to the integrity sidecar's blocks (so that each block
read can be checked whole: every byte restored is verified), merged where they touch or nearly
do, and read front to back in large chunks into one reused buffer, from which each chunk's
bytes are copied into the tensors waiting for them. A range whose bytes hold more than lands
(rows of a column-split shard) is read into scratch that lives while its file is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from fsspec import AbstractFileSystem

from ..errors import corrupt_checkpoint
from ..format.sidecar import UNCOVERED, Sidecar
from .shard_reads import ShardPiece

#: Bytes read per system call: large sequential reads, one buffer reused for all of them.
CHUNK_SIZE = 16 * 1024 * 1024
#: Ranges of one file closer than this are read as one (reading through beats a seek).
MERGE_GAP = 64 * 1024


@dataclass
class Read:
    """Bytes ``[start, end)`` of one data file, for one tensor (or one object's bytes:
    ``end == -1`` reads the whole file into ``target``, resized to fit)."""

    start: int
    end: int
    target: torch.Tensor  # contiguous; its bytes receive the range
    piece: ShardPiece | None = None  # target is scratch: piece.scatter() copies a rectangle out


@dataclass
class RestoreStats:
    """What a restore read: ``bytes_read`` (widened to sidecar blocks, coalesced) for the
    ``bytes_wanted`` that landed in the state, from ``files`` data files."""

    files: int = 0
    bytes_read: int = 0
    bytes_wanted: int = 0


def new_scratch() -> torch.Tensor:
    """The buffer every chunk is read into (one per restore)."""
    return torch.empty(CHUNK_SIZE, dtype=torch.uint8)


def read_file(
    fs: AbstractFileSystem,
    path: str,
    relative: str,
    reads: list[Read],
    sidecar: Sidecar | None,
    scratch: torch.Tensor,
    checkpoint: str,
    stats: RestoreStats,
) -> None:
    """Read the spans ``reads`` need from ``path`` (``relative`` to its checkpoint, as the
    sidecar names it), chunk by chunk; verify each chunk, copy it out.

    Bytes found wrong raise :class:`~tml_checkpointing.errors.CorruptCheckpointError` naming
    ``relative`` in ``checkpoint`` (the checkpoint that holds the file: a delta's base, when
    the read is of its chain); the reads before them have landed. A file ``sidecar`` has no
    record of is refused before any byte is read.
    """
    record = sidecar.files.get(relative) if sidecar is not None else None
    if sidecar is not None and record is None:
        _corrupt(checkpoint, relative, UNCOVERED)
    with fs.open(path, "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        if record is not None and size != record.size:
            _corrupt(checkpoint, relative, f"{size} bytes where {record.size} were recorded")
        for read in reads:
            if read.end < 0:  # an object: the whole file
                read.end = size
                read.target.resize_(size)
            elif read.piece is not None:  # scratch for rows of which a rectangle lands
                read.target = torch.empty(read.end - read.start, dtype=torch.uint8)
        reads = sorted((r for r in reads if r.end > r.start), key=lambda r: r.start)
        block = sidecar.block_size if record is not None and sidecar is not None else 1
        # Chunks start on block boundaries, so that each chunk's blocks are checked whole.
        chunk = max(block, CHUNK_SIZE // block * block)
        if scratch.numel() < chunk:
            scratch = torch.empty(chunk, dtype=torch.uint8)
        buffer = memoryview(scratch.numpy())  # type: ignore[arg-type]
        stats.files += 1
        stats.bytes_wanted += sum(read.end - read.start for read in reads)
        pending = 0  # the reads before this index ended before the current chunk
        for first, last in spans(reads, block, size):
            position = first
            while position < last:
                length = min(chunk, last - position)
                handle.seek(position)
                got = handle.readinto(buffer[:length])
                if got != length:
                    _corrupt(checkpoint, relative, f"ends at {position + (got or 0)} (truncated)")
                stats.bytes_read += length
                if record is not None and sidecar is not None:
                    problem = sidecar.mismatch(relative, position, buffer[:length])
                    if problem is not None:
                        _corrupt(checkpoint, relative, problem)
                pending = _copy_out(reads, pending, position, position + length, scratch)
                position += length
    for read in reads:
        if read.piece is not None:
            read.piece.scatter(read.target)
            read.target = torch.empty(0, dtype=torch.uint8)  # the scratch goes with its file


def spans(reads: list[Read], block: int, size: int) -> list[tuple[int, int]]:
    """Block-aligned ``[first, last)`` ranges covering every read (``reads`` sorted by
    start), in file order; ranges that touch, or lie within :data:`MERGE_GAP` of each other,
    merged. A read past the end of the file keeps its end (the read then finds it truncated).
    """
    merged: list[tuple[int, int]] = []
    for read in reads:
        first = (read.start // block) * block
        last = max(read.end, min(size, -(-read.end // block) * block))
        if merged and first <= merged[-1][1] + MERGE_GAP:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


def _copy_out(reads: list[Read], pending: int, start: int, end: int, scratch: torch.Tensor) -> int:
    """Copy the bytes of ``[start, end)`` held in ``scratch`` into every read they overlap
    (``reads`` sorted by start; those before ``pending`` are done). Returns the new
    ``pending``: chunks come in file order, so finished reads are not looked at again."""
    while pending < len(reads) and reads[pending].end <= start:
        pending += 1
    for read in reads[pending:]:
        if read.start >= end:
            break
        if read.end <= start:
            continue
        low, high = max(read.start, start), min(read.end, end)
        destination = _as_bytes(read.target)
        destination[low - read.start : high - read.start].copy_(scratch[low - start : high - start])
    return pending


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    flat: torch.Tensor = tensor.view(-1).view(torch.uint8)
    return flat


def _corrupt(checkpoint: str, relative: str, problem: str) -> None:
    raise corrupt_checkpoint(checkpoint, relative, problem, kind="data")
