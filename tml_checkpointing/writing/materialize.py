"""``materialize``: rewrite any checkpoint as a full, plain torchsnapshot checkpoint elsewhere.

Why: a delta checkpoint (incremental saves) needs its chain and this library to be read; plain
``torchsnapshot.Snapshot(path).restore`` cannot rebuild it. Materializing one gives a
self-contained checkpoint that any torchsnapshot reader restores, e.g. to hand a model to
another team, or to keep it after its chain is pruned. Every byte read is verified against the
sidecars of the chain; the copy is written through the same commit protocol as a save (claim,
data, sidecar, marker last), so a kill half-way leaves an uncommitted directory, never a
committed partial one.
"""

from __future__ import annotations

from typing import Any

import torch
from torchsnapshot.manifest import (
    ObjectEntry,
    PrimitiveEntry,
    SnapshotMetadata,
    TensorEntry,
    is_container_entry,
)
from torchsnapshot.serialization import string_to_dtype

from ..catalog.discovery import is_committed
from ..errors import CheckpointExistsError, SnapshotStateError, corrupt_checkpoint
from ..format.chain_link import DELTA_ROOT
from ..format.layout import COMMIT_MARKER, batched_file_name
from ..format.sidecar import Sidecar
from ..reading.chains import ancestry, chained_tensors, link_of, logical_metadata
from ..reading.fast_restore import RestorePlan, plan_chained, plan_read, read_planned
from ..reading.metadata import read_metadata, read_sidecar
from ..reading.verify import verify_checkpoint
from ..storage.faults import reading, writing
from ..storage.filesystem import StorageOptions, resolve
from ..storage.plugin import FsspecStoragePlugin
from .claims import write_claim


def materialize(
    checkpoint: str, destination: str, *, storage_options: StorageOptions | None = None
) -> str:
    """Write the state ``checkpoint`` restores as a full, plain checkpoint at ``destination``
    (a checkpoint path, e.g. ``<other save_dir>/<step>``); return ``destination``.

    Raises :class:`CheckpointExistsError` when ``destination`` is already committed,
    :class:`CorruptCheckpointError` when ``checkpoint`` (or its chain) does not verify.
    """
    if is_committed(destination, storage_options):
        raise CheckpointExistsError(
            f"{destination} is already a committed checkpoint; materialize into a new path"
        )
    verify_checkpoint(checkpoint, level="size", storage_options=storage_options)
    fs, root = resolve(checkpoint, storage_options)
    root = root.rstrip("/")
    with reading(f"checkpoint {checkpoint}"):
        metadata, why = read_metadata(fs, root, checkpoint)
        if metadata is None:
            raise corrupt_checkpoint(checkpoint, COMMIT_MARKER, why, kind="marker")
        if metadata.world_size != 1:
            raise SnapshotStateError(
                f"{checkpoint} was written by {metadata.world_size} ranks; it is already full "
                "and plain (only one-rank saves are incremental): copy it as it is"
            )
        link = link_of(metadata, checkpoint)
        chained = chained_tensors(ancestry(checkpoint, metadata, fs, root)) if link else {}
        logical = logical_metadata(metadata, link)
        tensors, objects, manifest = _read_state(logical, chained, fs, root, checkpoint)
    data_file = batched_file_name()
    data, offset = bytearray(sum(_nbytes(t) for t in tensors.values())), 0
    block = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    for path, tensor in tensors.items():
        size = _nbytes(tensor)
        block[offset : offset + size].copy_(tensor.contiguous().view(-1).view(torch.uint8))
        entry = manifest[path]
        assert isinstance(entry, TensorEntry)
        entry.location, entry.byte_range = data_file, [offset, offset + size]
        offset += size
    plain = SnapshotMetadata(
        version=metadata.version,
        world_size=1,
        manifest={f"0/{path}": entry for path, entry in manifest.items()},
    )
    with writing(f"checkpoint {destination}"):
        write_claim(destination, storage_options)
        plugin = FsspecStoragePlugin(destination, dict(storage_options or {}))
        plugin._write_data(data_file, memoryview(data))
        for location, raw in objects.items():
            plugin._write_data(location, raw)
        plugin._commit(plain.to_yaml().encode())
    return destination


def _read_state(
    logical: SnapshotMetadata,
    chained: dict[str, Any],
    fs: Any,
    root: str,
    checkpoint: str,
) -> tuple[dict[str, torch.Tensor], dict[str, bytes], dict[str, Any]]:
    """Every tensor's value (chained ones rebuilt), every object's bytes, and the manifest
    of the plain copy (containers, primitives and objects as they are; no chain entries)."""
    entries = {
        path[2:]: entry
        for path, entry in logical.manifest.items()
        if path.startswith("0/") and not path[2:].startswith(f"{DELTA_ROOT}/")
    }
    plan = RestorePlan(order=[], containers={})
    tensors: dict[str, torch.Tensor] = {}
    objects: dict[str, bytes] = {}
    manifest: dict[str, Any] = {}
    for path, entry in entries.items():
        if is_container_entry(entry) or isinstance(entry, PrimitiveEntry):
            manifest[path] = entry
        elif isinstance(entry, ObjectEntry) or (
            isinstance(entry, TensorEntry)
            and path not in chained
            and entry.byte_range is None
            and entry.serializer != "buffer_protocol"
        ):  # a file of its own (an object, a torch_save tensor): copied as it is
            objects[entry.location] = _read_verified(fs, root, entry.location, checkpoint)
            manifest[path] = entry
        elif isinstance(entry, TensorEntry) and entry.serializer == "buffer_protocol":
            tensor = torch.empty(list(entry.shape), dtype=string_to_dtype(entry.dtype))
            planned = (
                plan_chained(plan, chained[path], tensor)
                if path in chained
                else plan_read(plan, root, entry, tensor)
            )
            if not planned:
                raise SnapshotStateError(f"{checkpoint}: {path} cannot be read as one tensor")
            tensors[path] = tensor
            manifest[path] = TensorEntry(
                location="",
                serializer=entry.serializer,
                dtype=entry.dtype,
                shape=list(entry.shape),
                replicated=False,
            )
        else:
            raise SnapshotStateError(
                f"{checkpoint}: {path} is a {type(entry).__name__} "
                f"({getattr(entry, 'serializer', '')}); only plain tensors, objects and "
                "primitives are materialized"
            )
    sidecars: dict[str, Sidecar | None] = {
        directory: read_sidecar(fs, directory, checkpoint) for directory in plan.directories
    }
    read_planned(plan, fs, sidecars, checkpoint)
    return tensors, objects, manifest


def _read_verified(fs: Any, root: str, location: str, checkpoint: str) -> bytes:
    """A whole file of the checkpoint, checked against its sidecar record (if any)."""
    relative = location.lstrip("/")
    with fs.open(f"{root}/{relative}", "rb") as handle:
        raw: bytes = handle.read()
    sidecar = read_sidecar(fs, root, checkpoint)
    problem = sidecar.mismatch(relative, 0, raw) if sidecar is not None else None
    if problem is not None:
        raise corrupt_checkpoint(checkpoint, relative, problem, kind="data")
    return raw


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
