"""Restore from local data files straight into the state's own tensors, verifying on the way.

Why: torchsnapshot's restore turns every tensor into its own read request through an asyncio
loop, a fresh buffer per read, a deserialisation and a copy. On this machine that made a 1 GiB
restore 1.9x ``torch.load``'s time and 5,000 small tensors 11x. Here each data file is read
once, front to back, in large chunks into one reused buffer; each chunk's blocks are checked
against the integrity sidecar (every byte restored is verified, as on the torchsnapshot path)
and copied into the tensors the state's ``state_dict()`` already holds. Then, as torchsnapshot
does, each stateful gets ``load_state_dict`` of the inflated state dict, the RNG state last.

Only checkpoints this path restores exactly as torchsnapshot would take it: one rank's, on a
local filesystem, holding plain tensors (``buffer_protocol``), objects, primitives and
containers, with a block sidecar or none. Anything else (sharded or chunked tensors, other
serialisers, object stores, old whole-file sidecars) makes :func:`plan_restore` return
``None``, and the caller uses torchsnapshot. The plan is made before any byte is read, so
that decision never leaves a half-restored state.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from fsspec import AbstractFileSystem
from torchsnapshot import RNGState
from torchsnapshot.flatten import flatten, inflate
from torchsnapshot.manifest import (
    Entry,
    ObjectEntry,
    PrimitiveEntry,
    SnapshotMetadata,
    TensorEntry,
    is_container_entry,
)
from torchsnapshot.serialization import Serializer, string_to_dtype

from ..errors import corrupt_checkpoint
from ..format.sidecar import Sidecar
from ..format.torchsnapshot_compat import manifest_of_rank
from .chains import ChainedTensor

#: Bytes read per system call: large sequential reads, one buffer reused for all of them.
CHUNK_SIZE = 16 * 1024 * 1024


@dataclass
class _Read:
    """Bytes ``[start, end)`` of one data file, for one tensor (or one object's bytes)."""

    start: int
    end: int
    target: torch.Tensor  # contiguous; its bytes receive the range


@dataclass
class _Patch:
    """Changed rows of one chained tensor in one delta checkpoint, applied after the reads."""

    directory: str
    rows: TensorEntry
    values: TensorEntry
    target: torch.Tensor


File = tuple[str, str]  # (checkpoint directory, location within it)


@dataclass
class RestorePlan:
    """What to read into which tensor, decided before anything is read."""

    order: list[str]  # stateful keys, in restore order (the RNG state last)
    containers: dict[str, dict[str, Entry]]  # per key: its container entries
    values: dict[str, Any] = field(default_factory=dict)  # logical path -> restored value
    objects: dict[str, torch.Tensor] = field(default_factory=dict)  # path -> its raw bytes
    reads: dict[File, list[_Read]] = field(default_factory=dict)  # file -> reads
    patches: list[_Patch] = field(default_factory=list)  # oldest first, after the reads

    @property
    def directories(self) -> set[str]:
        return {directory for directory, _ in self.reads} | {p.directory for p in self.patches}


def plan_restore(
    metadata: SnapshotMetadata,
    app_state: Mapping[str, Any],
    directory: str,
    chained: Mapping[str, ChainedTensor] | None = None,
) -> RestorePlan | None:
    """The plan for restoring ``app_state`` from a one-rank checkpoint in ``directory``, or
    ``None``. ``chained`` (a delta checkpoint): the tensors rebuilt from its chain; then
    ``metadata`` is its logical metadata
    (:func:`~tml_checkpointing.reading.chains.logical_metadata`).
    """
    if metadata.world_size != 1 or (dist.is_initialized() and dist.get_world_size() > 1):
        return None
    chained = chained or {}
    manifest = manifest_of_rank(metadata, 0)
    order = [k for k in app_state if not isinstance(app_state[k], RNGState)]
    order += [k for k in app_state if isinstance(app_state[k], RNGState)]
    plan = RestorePlan(order=order, containers={})
    for key in order:
        entries = {p: e for p, e in manifest.items() if p == key or p.startswith(f"{key}/")}
        if not entries:
            return None  # torchsnapshot says what is missing
        _, flattened = flatten(app_state[key].state_dict(), prefix=key)
        plan.containers[key] = {}
        for path, entry in entries.items():
            if is_container_entry(entry):
                plan.containers[key][path] = entry
            elif type(entry) is PrimitiveEntry:
                plan.values[path] = entry.get_value()
            elif type(entry) is ObjectEntry and entry.serializer == Serializer.TORCH_SAVE.value:
                plan.objects[path] = torch.empty(0, dtype=torch.uint8)  # sized when read
                where = (directory, entry.location)
                plan.reads.setdefault(where, []).append(_Read(0, -1, plan.objects[path]))
            elif path in chained:
                tensor = _target(entry, flattened.get(path))  # type: ignore[arg-type]
                if not plan_chained(plan, chained[path], tensor):
                    return None
                plan.values[path] = tensor
            elif type(entry) is TensorEntry and _plain(entry):
                tensor = _target(entry, flattened.get(path))
                if not plan_read(plan, directory, entry, tensor):
                    return None
                plan.values[path] = tensor
            else:
                return None
    return plan


def plan_read(plan: RestorePlan, directory: str, entry: TensorEntry, tensor: torch.Tensor) -> bool:
    start, end = entry.byte_range or (0, _nbytes(tensor))
    if end - start != _nbytes(tensor):
        return False
    plan.reads.setdefault((directory, entry.location), []).append(_Read(start, end, tensor))
    return True


def plan_chained(plan: RestorePlan, chained: ChainedTensor, tensor: torch.Tensor) -> bool:
    """Read the tensor's whole copy from the chain's base, then patch each delta's rows."""
    base, entry = chained.base
    if not _plain(entry) or list(entry.shape) != list(tensor.shape):
        return False
    if string_to_dtype(entry.dtype) != tensor.dtype:
        return False
    if not plan_read(plan, base.root, entry, tensor):
        return False
    for ancestor, rows, values in chained.deltas:
        plan.patches.append(_Patch(ancestor.root, rows, values, tensor))
    return True


def run_restore(
    plan: RestorePlan,
    app_state: Mapping[str, Any],
    fs: AbstractFileSystem,
    sidecars: Mapping[str, Sidecar | None],
    checkpoint: str,
) -> None:
    """Read every planned range (verified against its directory's sidecar in ``sidecars``,
    when there is one), patch chained tensors with their deltas, then load.

    Check :func:`can_verify` first. A corrupt block raises :class:`CorruptCheckpointError`
    after the blocks before it were copied (as on the torchsnapshot path, which restores one
    stateful after another): restore an older checkpoint then.
    """
    read_planned(plan, fs, sidecars, checkpoint)
    for path, raw in plan.objects.items():
        plan.values[path] = torch.load(io.BytesIO(raw.numpy().tobytes()))  # as torchsnapshot
    for key in plan.order:
        state_dict = inflate(plan.containers[key], plan.values, prefix=key)
        app_state[key].load_state_dict(state_dict)


def read_planned(
    plan: RestorePlan,
    fs: AbstractFileSystem,
    sidecars: Mapping[str, Sidecar | None],
    checkpoint: str,
) -> None:
    """Read every planned range into its target, then apply the deltas, oldest first."""
    scratch = torch.empty(CHUNK_SIZE, dtype=torch.uint8)
    for (directory, location), reads in plan.reads.items():
        sidecar = sidecars.get(directory)
        _read_file(fs, directory, location, reads, sidecar, scratch, checkpoint)
    for patch in plan.patches:  # one delta's rows in memory at a time
        rows = torch.empty(list(patch.rows.shape), dtype=torch.int64)
        values = torch.empty(list(patch.values.shape), dtype=string_to_dtype(patch.values.dtype))
        reads = [_Read(*_range(patch.rows), rows), _Read(*_range(patch.values), values)]
        sidecar = sidecars.get(patch.directory)
        _read_file(fs, patch.directory, patch.rows.location, reads, sidecar, scratch, checkpoint)
        if rows.numel():
            patch.target.index_copy_(0, rows, values)


def read_chained_tensor(
    fs: AbstractFileSystem,
    chained: ChainedTensor,
    out: torch.Tensor,
    sidecars: Mapping[str, Sidecar | None],
    checkpoint: str,
) -> None:
    """Rebuild one chained tensor (its base, then its deltas) into ``out``."""
    in_place = _lands_in(chained.base[1], out)
    landing = out.detach() if in_place else torch.empty_like(out)
    plan = RestorePlan(order=[], containers={})
    if not plan_chained(plan, chained, landing):
        raise ValueError(
            f"{chained.path} ({chained.base[1].dtype} {list(chained.base[1].shape)}) cannot be "
            f"read into a {out.dtype} {list(out.shape)} tensor"
        )
    read_planned(plan, fs, sidecars, checkpoint)
    if not in_place:
        out.copy_(landing)


def can_verify(plan: RestorePlan, sidecars: Mapping[str, Sidecar | None]) -> bool:
    """Whether the sidecars (where there are) have block checksums for the files the plan
    reads (a v1 sidecar's whole-file checksums are checked by torchsnapshot's path)."""
    files = [*plan.reads, *((p.directory, p.rows.location) for p in plan.patches)]
    for directory, location in files:
        sidecar = sidecars.get(directory)
        record = sidecar.files.get(location.lstrip("/")) if sidecar is not None else None
        if record is not None and not record.blocks:
            return False
    return True


def _range(entry: TensorEntry) -> tuple[int, int]:
    assert entry.byte_range is not None  # delta entries always have one
    return entry.byte_range[0], entry.byte_range[1]


def _plain(entry: TensorEntry) -> bool:
    return entry.serializer == Serializer.BUFFER_PROTOCOL.value


def _target(entry: TensorEntry, current: Any) -> torch.Tensor:
    """The state's own tensor when the bytes can land in it as they are, else a new one."""
    if _lands_in(entry, current):
        own: torch.Tensor = current.detach()  # shares its storage: the bytes land in the state
        return own
    return torch.empty(list(entry.shape), dtype=string_to_dtype(entry.dtype))


def _lands_in(entry: TensorEntry, current: Any) -> bool:
    """Whether the entry's bytes can be read straight into ``current``."""
    return (
        type(current) in (torch.Tensor, torch.nn.Parameter)
        and current.device.type == "cpu"
        and current.dtype == string_to_dtype(entry.dtype)
        and list(current.shape) == list(entry.shape)
        and current.is_contiguous()
        and not current.is_quantized
    )


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    flat: torch.Tensor = tensor.view(-1).view(torch.uint8)
    return flat


def _read_file(
    fs: AbstractFileSystem,
    directory: str,
    location: str,
    reads: list[_Read],
    sidecar: Sidecar | None,
    scratch: torch.Tensor,
    checkpoint: str,
) -> None:
    """Read the spans ``reads`` need, chunk by chunk, verify each chunk, copy it out."""
    relative = location.lstrip("/")
    record = sidecar.files.get(relative) if sidecar is not None else None
    with fs.open(f"{directory}/{relative}", "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        if record is not None and size != record.size:
            _corrupt(checkpoint, relative, f"{size} bytes where {record.size} were recorded")
        for read in reads:
            if read.end < 0:  # an object: the whole file
                read.end = size
                read.target.resize_(size)
        reads = sorted((r for r in reads if r.end > r.start), key=lambda r: r.start)
        block = sidecar.block_size if record is not None and sidecar is not None else 1
        buffer = memoryview(scratch.numpy())  # type: ignore[arg-type]
        for first, last in _spans(reads, block, size):
            position = first
            while position < last:
                length = min(CHUNK_SIZE, last - position)
                handle.seek(position)
                got = handle.readinto(buffer[:length])
                if got != length:
                    _corrupt(checkpoint, relative, f"ends at {position + (got or 0)} (truncated)")
                if record is not None and sidecar is not None:
                    problem = sidecar.mismatch(relative, position, buffer[:length])
                    if problem is not None:
                        _corrupt(checkpoint, relative, problem)
                _copy_out(reads, position, position + length, scratch)
                position += length


def _spans(reads: list[_Read], block: int, size: int) -> list[tuple[int, int]]:
    """Block-aligned, merged ``[first, last)`` ranges covering every read, in file order."""
    spans: list[tuple[int, int]] = []
    for read in reads:
        first = (read.start // block) * block
        last = min(size, -(-read.end // block) * block)
        if spans and first <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], last))
        else:
            spans.append((first, last))
    return spans


def _copy_out(reads: list[_Read], start: int, end: int, scratch: torch.Tensor) -> None:
    """Copy the bytes of ``[start, end)`` held in ``scratch`` into every read they overlap."""
    for read in reads:
        if read.end <= start:
            continue
        if read.start >= end:
            break
        low, high = max(read.start, start), min(read.end, end)
        destination = _as_bytes(read.target)
        destination[low - read.start : high - read.start].copy_(scratch[low - start : high - start])


def _corrupt(checkpoint: str, relative: str, problem: str) -> None:
    raise corrupt_checkpoint(checkpoint, relative, problem, kind="data")
