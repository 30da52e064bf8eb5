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
    Shard,
    ShardedTensorEntry,
    SnapshotMetadata,
    TensorEntry,
    is_container_entry,
)
from torchsnapshot.serialization import string_to_dtype

from ..catalog.discovery import is_committed
from ..catalog.save_dir import holds_run
from ..errors import (
    CheckpointExistsError,
    MaterializeDestinationError,
    SnapshotStateError,
    corrupt_checkpoint,
)
from ..format.chain_link import DELTA_ROOT
from ..format.layout import COMMIT_MARKER, batched_file_name
from ..format.sidecar import Sidecar
from ..reading.chains import ancestry, chained_tensors, link_of, logical_metadata
from ..reading.delta_rows import entry_dtype, entry_global_shape
from ..reading.fast_restore import RestorePlan, plan_chained, plan_piece, plan_read, read_planned
from ..reading.metadata import read_metadata, read_sidecars
from ..reading.shard_reads import plan_shards
from ..reading.verify import verify_checkpoint
from ..storage.faults import reading, writing
from ..storage.filesystem import StorageOptions, parent_url, resolve
from ..storage.plugin import FsspecStoragePlugin
from .claims import write_claim


def materialize(
    checkpoint: str, destination: str, *, storage_options: StorageOptions | None = None
) -> str:
    """Write the state ``checkpoint`` restores as a full, plain checkpoint at ``destination``
    (a checkpoint path, e.g. ``<other save_dir>/<step>``); return ``destination``.

    Raises :class:`CheckpointExistsError` when ``destination`` is already committed,
    :class:`MaterializeDestinationError` when it is a save_dir or inside one (materialize
    outside every save_dir), :class:`CorruptCheckpointError` when ``checkpoint`` (or its
    chain) does not verify.
    """
    if is_committed(destination, storage_options):
        raise CheckpointExistsError(
            f"{destination} is already a committed checkpoint; materialize into a new path"
        )
    _check_destination(destination, storage_options)
    verify_checkpoint(checkpoint, level="size", storage_options=storage_options)
    fs, root = resolve(checkpoint, storage_options)
    root = root.rstrip("/")
    with reading(f"checkpoint {checkpoint}"):
        metadata, why = read_metadata(fs, root, checkpoint)
        if metadata is None:
            raise corrupt_checkpoint(checkpoint, COMMIT_MARKER, why, kind="marker")
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
        if isinstance(entry, ShardedTensorEntry):  # one shard: the whole tensor
            entry = entry.shards[0].tensor
        assert isinstance(entry, TensorEntry)
        entry.location, entry.byte_range = data_file, [offset, offset + size]
        offset += size
    plain = SnapshotMetadata(
        version=metadata.version, world_size=metadata.world_size, manifest=manifest
    )
    with writing(f"checkpoint {destination}"):
        write_claim(destination, storage_options)
        plugin = FsspecStoragePlugin(destination, dict(storage_options or {}))
        plugin._write_data(data_file, memoryview(data))
        for location, raw in objects.items():
            plugin._write_data(location, raw)
        plugin._commit(plain.to_yaml().encode())
    return destination


def _check_destination(destination: str, storage_options: StorageOptions | None) -> None:
    """Refuse a destination in a save_dir (or a save_dir itself): a copy there is taken for
    a step of that run, so a resume would start from the state of another step."""
    parent = parent_url(destination)
    if holds_run(destination, storage_options):
        where = f"{destination} is a save_dir (it holds <step> checkpoints or a run's files)"
    elif holds_run(parent, storage_options) or is_committed(parent, storage_options):
        where = f"{destination} is inside the save_dir {parent}"
    else:
        return
    raise MaterializeDestinationError(
        f"{where}: a checkpoint materialized there is taken for a step of that run, and a "
        "resumed run would start from it. Materialize to a path outside the save_dir "
        "(e.g. <export dir>/<step>); nothing was written"
    )


def _read_state(
    logical: SnapshotMetadata,
    chained: dict[str, Any],
    fs: Any,
    root: str,
    checkpoint: str,
) -> tuple[dict[str, torch.Tensor], dict[str, bytes], dict[str, Any]]:
    """Every tensor's value (chained ones rebuilt), every object's bytes, and the manifest
    of the plain copy (``<rank>/<path>``; containers, primitives and objects as they are; no
    chain entries). A sharded tensor is written whole, as one shard of rank 0 (the other
    ranks list it with no shard): any number of ranks restores its rows from it."""
    plan = RestorePlan(order=[], containers={})
    tensors: dict[str, torch.Tensor] = {}
    objects: dict[str, bytes] = {}
    manifest: dict[str, Any] = {}
    merged = _sharded_entries(logical)
    for global_path, entry in logical.manifest.items():
        rank, path = global_path.split("/", 1)
        if path.startswith(f"{DELTA_ROOT}/"):
            continue
        if path in chained or isinstance(entry, ShardedTensorEntry):
            sharded = isinstance(entry, ShardedTensorEntry) or chained[path].sharded
            if rank != "0":
                if sharded:
                    manifest[global_path] = ShardedTensorEntry(shards=[])
                continue  # a replicated tensor: rank 0's entry serves every rank
            base = chained[path].base[1] if path in chained else merged[path]
            shape, dtype = entry_global_shape(base), entry_dtype(base)
            tensor = torch.empty(shape, dtype=string_to_dtype(dtype))
            planned = (
                plan_chained(plan, chained[path], tensor)
                if path in chained
                else _plan_whole(plan, root, merged[path], tensor)
            )
            if not planned:
                raise SnapshotStateError(f"{checkpoint}: {path} cannot be read as one tensor")
            tensors[global_path] = tensor
            whole = _tensor_entry(dtype, shape, replicated=getattr(base, "replicated", False))
            manifest[global_path] = (
                ShardedTensorEntry(
                    shards=[Shard(offsets=[0] * len(shape), sizes=shape, tensor=whole)]
                )
                if sharded
                else whole
            )
        elif is_container_entry(entry) or isinstance(entry, PrimitiveEntry):
            manifest[global_path] = entry
        elif isinstance(entry, ObjectEntry) or (
            isinstance(entry, TensorEntry)
            and entry.byte_range is None
            and entry.serializer != "buffer_protocol"
        ):  # a file of its own (an object, a torch_save tensor): copied as it is
            objects[entry.location] = _read_verified(fs, root, entry.location, checkpoint)
            manifest[global_path] = entry
        elif isinstance(entry, TensorEntry) and entry.serializer == "buffer_protocol":
            tensor = torch.empty(list(entry.shape), dtype=string_to_dtype(entry.dtype))
            if not plan_read(plan, root, entry, tensor):
                raise SnapshotStateError(f"{checkpoint}: {path} cannot be read as one tensor")
            tensors[global_path] = tensor
            manifest[global_path] = _tensor_entry(
                entry.dtype, list(entry.shape), replicated=entry.replicated
            )
        else:
            raise SnapshotStateError(
                f"{checkpoint}: {path} is a {type(entry).__name__} "
                f"({getattr(entry, 'serializer', '')}); only tensors (plain or sharded), "
                "objects and primitives are materialized"
            )
    sidecars: dict[str, Sidecar | None] = read_sidecars(fs, plan.directories, checkpoint)
    read_planned(plan, fs, sidecars, checkpoint)
    return tensors, objects, manifest


def _sharded_entries(metadata: SnapshotMetadata) -> dict[str, ShardedTensorEntry]:
    """Every sharded tensor's entry with the shards of every saving rank."""
    merged: dict[str, ShardedTensorEntry] = {}
    for global_path, entry in metadata.manifest.items():
        if isinstance(entry, ShardedTensorEntry):
            path = global_path.split("/", 1)[1]
            merged.setdefault(path, ShardedTensorEntry(shards=[])).shards.extend(entry.shards)
    return merged


def _plan_whole(
    plan: RestorePlan, root: str, entry: ShardedTensorEntry, tensor: torch.Tensor
) -> bool:
    pieces = plan_shards(entry, tensor)
    if pieces is None:
        return False
    for piece in pieces:
        plan_piece(plan, root, piece)
    return True


def _tensor_entry(dtype: str, shape: list[int], *, replicated: bool) -> TensorEntry:
    """A plain tensor of the copy's data file (placed when the file is laid out)."""
    return TensorEntry(
        location="",
        serializer="buffer_protocol",
        dtype=dtype,
        shape=list(shape),
        replicated=replicated,
    )


def _read_verified(fs: Any, root: str, location: str, checkpoint: str) -> bytes:
    """A whole file of the checkpoint, checked against its sidecar record (if any)."""
    relative = location.lstrip("/")
    with fs.open(f"{root}/{relative}", "rb") as handle:
        raw: bytes = handle.read()
    sidecar = read_sidecars(fs, [root], checkpoint)[root]
    problem = sidecar.mismatch(relative, 0, raw) if sidecar is not None else None
    if problem is not None:
        raise corrupt_checkpoint(checkpoint, relative, problem, kind="data")
    return raw


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
