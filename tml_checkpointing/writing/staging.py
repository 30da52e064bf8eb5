"""Staging for the writer process: one shared-memory copy of the state, allocated once, reused.

Why: a checkpoint must hold the state as it was when ``save()`` returned, while training goes
on and changes it. torchsnapshot clones every tensor into fresh memory for that (~1 s per GiB
of allocation and page faults, every save). Here the tensors are laid out once, 4 KiB aligned,
in one ``multiprocessing.shared_memory`` block, and each save is a ``copy_`` into it (memory
bandwidth, no allocation). The writer process maps the same block and writes it to storage as
one large sequential file, so the training process never runs the I/O.

The file keeps torchsnapshot's format: one ``batched/`` data file whose byte ranges the manifest
names (as torchsnapshot's own batching does), ``torch_save`` files for other objects, primitives
inline. Plain ``torchsnapshot.Snapshot(path).restore`` reads it.

:func:`plan_save` decides whether a state can take this path: CPU tensors of buffer-protocol
dtypes, any containers, any picklable leaves. Sharded tensors (TorchRec), DTensors, GPU or
quantized tensors return ``None`` and the save goes through torchsnapshot as before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import uuid
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from typing import Any

import torch
import torchsnapshot
from torchsnapshot.flatten import flatten
from torchsnapshot.io_preparer import PrimitivePreparer
from torchsnapshot.manifest import Entry, ObjectEntry, SnapshotMetadata, TensorEntry
from torchsnapshot.serialization import BUFFER_PROTOCOL_SUPPORTED_DTYPES, dtype_to_string

from ..format.chain_link import (
    CHAIN_ENTRY,
    ChainLink,
    DeltaTensor,
    delta_rows_path,
    delta_values_path,
    new_link_id,
)
from ..format.layout import batched_file_name, delta_file_name
from .incremental import (
    MAX_CHAIN_FRACTION,
    MIN_CHAINED_BYTES,
    changed_rows,
    is_chainable,
    row_bytes,
)

ALIGNMENT = 4096  # every tensor starts on a page: direct I/O and page-sized reads stay aligned


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lives in the staging block (and in the data file)."""

    path: str  # logical path, e.g. model/weight
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    rows_offset: int = -1  # chained (incremental): where its changed-row indices are staged

    @property
    def chained(self) -> bool:
        return self.rows_offset >= 0


@dataclass
class SavePlan:
    """The state's tensors laid out in one block; reused while the layout does not change."""

    slots: list[TensorSlot]
    size: int  # bytes of the block, aligned
    key: tuple[tuple[str, str, tuple[int, ...]], ...] = field(repr=False)
    # The data file of a full save is the block's first ``full_size`` bytes; a delta save
    # writes the first ``dense_size`` (the tensors that are never chained come first).
    full_size: int = 0
    dense_size: int = 0

    @property
    def chained(self) -> list[TensorSlot]:
        return [slot for slot in self.slots if slot.chained]


@dataclass(frozen=True)
class Gather:
    """Changed rows of one chained tensor, for the writer to gather from the staging block
    into the delta file: ``count`` int64 indices at ``rows_offset``, then the rows."""

    slot_offset: int
    row_bytes: int
    rows_offset: int
    count: int


@dataclass
class StagedSave:
    """What one save hands the writer: the data is in the staging block; the rest is here."""

    data_file: str
    data_size: int
    objects: dict[str, bytes]  # relative location -> torch_save bytes
    metadata: str  # the commit marker's content (torchsnapshot metadata, YAML/JSON)
    delta_file: str = ""  # a delta save: where the changed rows go
    gathers: list[Gather] = field(default_factory=list)
    link: ChainLink | None = None  # an incremental save's place in its chain


@dataclass(frozen=True)
class ChainRequest:
    """How an incremental save relates to its chain, decided by the Snapshot before staging."""

    parent: str | None  # step name of the committed parent; None: write a full checkpoint
    parent_link: ChainLink | None
    full_every: int
    max_chain_fraction: float = MAX_CHAIN_FRACTION


def flatten_state(app_state: Mapping[str, Any]) -> tuple[dict[str, Entry], dict[str, Any]]:
    """Containers (manifest entries) and leaves of every stateful's ``state_dict``.

    The RNG state is read first and put back afterwards, as torchsnapshot does: another
    stateful's ``state_dict`` may draw random numbers, and the checkpoint must hold the RNG
    state of the moment of the save.
    """
    manifest: dict[str, Entry] = {}
    leaves: dict[str, Any] = {}
    rng_keys = [k for k, v in app_state.items() if isinstance(v, torchsnapshot.RNGState)]
    rng_states = {key: app_state[key].state_dict() for key in rng_keys}
    for key, state in rng_states.items():
        containers, flat = flatten(state, prefix=key)
        manifest.update(containers)
        leaves.update(flat)
    for key, stateful in app_state.items():
        if key in rng_states:
            continue
        containers, flat = flatten(stateful.state_dict(), prefix=key)
        manifest.update(containers)
        leaves.update(flat)
    for key, state in rng_states.items():
        app_state[key].load_state_dict(state)
    return manifest, leaves


def plan_save(
    leaves: Mapping[str, Any], incremental: bool = False, min_chained_bytes: int = MIN_CHAINED_BYTES
) -> SavePlan | None:
    """The block layout for ``leaves``' tensors, or ``None`` if some leaf needs torchsnapshot.

    ``incremental``: large row-shaped tensors (:func:`~tml_checkpointing.format.chain_link
    .is_chainable`) go after all the others, each with room for its changed-row indices at
    the end of the block, so a delta save writes one prefix of the block plus the rows.
    """
    tensors: list[tuple[str, torch.Tensor]] = []
    for path, value in leaves.items():
        if isinstance(value, torch.Tensor):
            if not _stageable(value):
                return None
            tensors.append((path, value))
        elif _needs_torchsnapshot(value):
            return None
    chained = {
        path for path, value in tensors if incremental and is_chainable(value, min_chained_bytes)
    }
    slots: list[TensorSlot] = []
    offset = 0
    for path, value in sorted(tensors, key=lambda item: item[0] in chained):  # stable
        nbytes = value.numel() * value.element_size()
        slots.append(TensorSlot(path, value.dtype, tuple(value.shape), offset, nbytes))
        offset += _aligned(nbytes)
    dense_size = sum(_aligned(s.nbytes) for s in slots if s.path not in chained)
    full_size = offset
    for index, slot in enumerate(slots):
        if slot.path in chained:
            slots[index] = dataclasses.replace(slot, rows_offset=offset)
            offset += _aligned(slot.shape[0] * 8)
    return SavePlan(
        slots=slots,
        size=max(offset, ALIGNMENT),
        key=plan_key(leaves),
        full_size=max(full_size, ALIGNMENT),
        dense_size=dense_size,
    )


BLOCK_PREFIX = "tml-staging-"  # + owner pid + random: tml-staging-<pid>-<hex>
SHM_DIR = "/dev/shm"


def sweep_dead_blocks(directory: str = SHM_DIR) -> list[str]:
    """Unlink staging blocks whose process is gone; return their names.

    Why: a training process killed by SIGKILL (an OOM kill) cannot unlink its block, and its
    resource tracker dies with its process group; the block (one copy of the state) would sit
    in memory until reboot. The next staging on the machine removes it. A reused PID only
    delays that (never removes a live process's block).
    """
    try:
        names = [n for n in os.listdir(directory) if n.startswith(BLOCK_PREFIX)]
    except OSError:
        return []
    removed = []
    for name in names:
        owner = name[len(BLOCK_PREFIX) :].split("-", 1)[0]
        if not owner.isdigit() or _alive(int(owner)):
            continue
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(directory, name))
            removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def shared_memory_room(needed: int, directory: str = SHM_DIR) -> bool:
    """Whether ``needed`` bytes fit in the shared-memory filesystem, with 10% to spare.

    Why ask first: creating a segment larger than what is free succeeds (it is sparse), and
    the process then dies of SIGBUS when a copy touches a page the filesystem cannot supply.
    Containers often mount a small ``/dev/shm`` (Docker: 64 MB). No such directory (not
    Linux): Python's shared memory has its own backing there, and it is assumed to fit.
    """
    try:
        stats = os.statvfs(directory)
    except OSError:
        return True
    return stats.f_bavail * stats.f_frsize >= needed * 1.1


def plan_key(leaves: Mapping[str, Any]) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    """What a plan depends on: the tensors' paths, dtypes and shapes (cheap to compare)."""
    return tuple(
        (path, str(value.dtype), tuple(value.shape))
        for path, value in leaves.items()
        if isinstance(value, torch.Tensor)
    )


class StagingArea:
    """A shared-memory block laid out by a :class:`SavePlan`; tensors are copied in per save.

    The block is freed (unlinked from ``/dev/shm``) by :meth:`close` or when the last
    reference goes, whichever comes first: the Snapshot holds the area, and so does every save
    in flight, so a ``Snapshot(...).save(step).wait()`` one-liner keeps it while writing.
    ``on_free(name)`` is told when that happens (the writer process unmaps it then).
    """

    def __init__(self, plan: SavePlan, on_free: Callable[[str], None] | None = None) -> None:
        self.plan = plan
        sweep_dead_blocks()
        self.memory = shared_memory.SharedMemory(
            name=f"{BLOCK_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}", create=True, size=plan.size
        )
        self._free = weakref.finalize(self, _free_block, self.memory, on_free)
        block = torch.frombuffer(self.memory.buf, dtype=torch.uint8, count=plan.size)
        self._slots = {slot.path: slot for slot in plan.slots}
        self._views = {
            slot.path: block[slot.offset : slot.offset + slot.nbytes]
            .view(slot.dtype)
            .view(slot.shape)
            for slot in plan.slots
        }

    @property
    def name(self) -> str:
        return self.memory.name

    def stage(
        self,
        containers: Mapping[str, Entry],
        leaves: Mapping[str, Any],
        rank: int = 0,
        chain: ChainRequest | None = None,
    ) -> StagedSave:
        """Copy the tensors in (the caller may change them as soon as this returns) and
        describe everything else; ``containers`` and ``leaves`` come from :func:`flatten_state`.

        ``chain`` (incremental saves): with a parent, each chained tensor is compared with its
        staged copy (the parent's values) and only the changed rows are copied and written;
        the save is full instead when those rows would take the chain past
        ``chain.max_chain_fraction`` of a full checkpoint.
        """
        data_file = batched_file_name()  # fresh per attempt (see the function)
        manifest: dict[str, Entry] = dict(containers)
        objects: dict[str, bytes] = {}
        changed = self._stage_chained(leaves, chain) if chain and chain.parent else None
        for path, value in leaves.items():
            if isinstance(value, torch.Tensor):
                slot = self._slots[path]
                if changed is not None and slot.chained:
                    continue  # its changed rows were staged above; described below
                self._views[path].copy_(value.detach())
                manifest[path] = TensorEntry(
                    location=data_file,
                    serializer="buffer_protocol",
                    dtype=dtype_to_string(value.dtype),
                    shape=list(value.shape),
                    replicated=False,
                    byte_range=[slot.offset, slot.offset + slot.nbytes],
                )
            elif PrimitivePreparer.should_inline(value):
                manifest[path] = PrimitivePreparer.prepare_write(value)
            else:
                location = f"{rank}/{path}"
                buffer = io.BytesIO()
                torch.save(value, buffer)
                objects[location] = buffer.getvalue()
                obj_type = f"{type(value).__module__}.{type(value).__qualname__}"
                manifest[path] = ObjectEntry(
                    location=location, serializer="torch_save", obj_type=obj_type, replicated=False
                )
        staged = StagedSave(
            data_file=data_file,
            data_size=self.plan.full_size if chain else self.plan.size,
            objects=objects,
            metadata="",
        )
        if chain is not None:
            self._describe_chain(staged, manifest, chain, changed)
        staged.metadata = SnapshotMetadata(
            version=torchsnapshot.__version__,
            world_size=1,
            manifest={f"{rank}/{path}": entry for path, entry in manifest.items()},
        ).to_yaml()
        return staged

    def _stage_chained(
        self, leaves: Mapping[str, Any], chain: ChainRequest
    ) -> dict[str, torch.Tensor] | None:
        """Stage the changed rows of every chained tensor; ``{path: row indices}``, or
        ``None`` when a full save is due (then everything was copied in whole)."""
        parent = chain.parent_link
        assert parent is not None
        if parent.depth + 1 >= chain.full_every:
            return None  # a full save is due: no compare, every tensor is copied whole
        changed: dict[str, torch.Tensor] = {}
        delta_bytes = 0
        for slot in self.plan.chained:
            value, staged = leaves[slot.path].detach(), self._views[slot.path]
            rows = changed_rows(value, staged)
            if rows.numel():
                staged.index_copy_(0, rows, value.index_select(0, rows))
            changed[slot.path] = rows
            delta_bytes += rows.numel() * (8 + row_bytes(slot.shape, value.element_size()))
        if parent.chain_bytes + delta_bytes > chain.max_chain_fraction * parent.full_bytes:
            return None  # the staged copies are current: the full save writes them as they are
        for slot in self.plan.chained:
            rows = changed[slot.path]
            self._rows_view(slot)[: rows.numel()].copy_(rows)
        return changed

    def _rows_view(self, slot: TensorSlot) -> torch.Tensor:
        block = torch.frombuffer(self.memory.buf, dtype=torch.uint8, count=self.plan.size)
        return block[slot.rows_offset : slot.rows_offset + slot.shape[0] * 8].view(torch.int64)

    def _describe_chain(
        self,
        staged: StagedSave,
        manifest: dict[str, Entry],
        chain: ChainRequest,
        changed: dict[str, torch.Tensor] | None,
    ) -> None:
        """Add the chain link (and, for a delta, the rows/values entries) to the manifest."""
        full_bytes = sum(slot.nbytes for slot in self.plan.slots)
        parent = chain.parent_link
        if changed is None or parent is None:
            staged.link = ChainLink(
                id=new_link_id(),
                parent=None,
                parent_id=None,
                depth=0,
                written_bytes=full_bytes,
                full_bytes=full_bytes,
                chain_bytes=0,
            )
            manifest[CHAIN_ENTRY] = staged.link.entry()
            return
        staged.delta_file = delta_file_name()
        staged.data_size = self.plan.dense_size
        offset, tensors = 0, []
        for index, slot in enumerate(self.plan.chained):
            rows = changed[slot.path]
            count, width = rows.numel(), row_bytes(slot.shape, slot.dtype.itemsize)
            staged.gathers.append(Gather(slot.offset, width, slot.rows_offset, count))
            manifest[delta_rows_path(index)] = _tensor_entry(
                staged.delta_file, torch.int64, [count], offset
            )
            offset += count * 8
            manifest[delta_values_path(index)] = _tensor_entry(
                staged.delta_file, slot.dtype, [count, *slot.shape[1:]], offset
            )
            offset += count * width
            tensors.append(DeltaTensor(slot.path, dtype_to_string(slot.dtype), slot.shape, count))
        dense_bytes = sum(slot.nbytes for slot in self.plan.slots if not slot.chained)
        staged.link = ChainLink(
            id=new_link_id(),
            parent=chain.parent,
            parent_id=parent.id,
            depth=parent.depth + 1,
            written_bytes=dense_bytes + offset,
            full_bytes=full_bytes,
            chain_bytes=parent.chain_bytes + offset,
            tensors=tuple(tensors),
        )
        manifest[CHAIN_ENTRY] = staged.link.entry()

    def close(self) -> None:
        """Free the block now (the writer process unmaps its own mapping on its next command)."""
        self._views.clear()
        self._free()


def _free_block(memory: shared_memory.SharedMemory, on_free: Callable[[str], None] | None) -> None:
    """Unlink the block; unmap it here unless tensor views still point into it (then the
    mapping goes with them). Runs from finalizers too: must not raise, must not block."""
    with contextlib.suppress(FileNotFoundError):
        memory.unlink()
    with contextlib.suppress(BufferError):
        memory.close()
    if on_free is not None:
        on_free(memory.name)


def _tensor_entry(location: str, dtype: torch.dtype, shape: list[int], start: int) -> TensorEntry:
    nbytes = dtype.itemsize
    for size in shape:
        nbytes *= size
    return TensorEntry(
        location=location,
        serializer="buffer_protocol",
        dtype=dtype_to_string(dtype),
        shape=shape,
        replicated=False,
        byte_range=[start, start + nbytes],
    )


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT if nbytes else 0


def _stageable(tensor: torch.Tensor) -> bool:
    plain = type(tensor) is torch.Tensor or type(tensor) is torch.nn.Parameter
    return (
        plain
        and tensor.device.type == "cpu"
        and tensor.layout == torch.strided
        and not tensor.is_quantized
        and tensor.dtype in BUFFER_PROTOCOL_SUPPORTED_DTYPES
    )


def _needs_torchsnapshot(value: Any) -> bool:
    """Leaves torchsnapshot treats specially (sharded, distributed): not ours to stage."""
    name = type(value).__name__
    return name in {"ShardedTensor", "DTensor"}
