"""Staging for the writer process: one shared-memory copy of a rank's state, allocated once.

Why: a checkpoint must hold the state as it was when ``save()`` returned, while training goes
on and changes it. torchsnapshot clones every tensor into fresh memory for that (~1 s per GiB
of allocation and page faults, every save). Here the tensors are laid out once, 4 KiB aligned,
in one ``multiprocessing.shared_memory`` block, and each save is a ``copy_`` into it (memory
bandwidth, no allocation). The writer process maps the same block and writes it to storage as
one large sequential file, so the training process never runs the I/O. Every rank of a job has
its own block and its own writer (:mod:`~tml_checkpointing.writing.rank_commit` joins them).

The file keeps torchsnapshot's format: one ``batched/`` data file per rank whose byte ranges
the manifest names (as torchsnapshot's own batching does), local shards of sharded tensors as
``ShardedTensor`` entries (any rank of any later job reads its rows from them), ``torch_save``
files for other objects, primitives inline. Plain ``torchsnapshot.Snapshot(path).restore``
reads it. What is staged: :mod:`~tml_checkpointing.writing.save_plan`.

CUDA tensors are copied device-to-host without blocking into the block, registered with CUDA
as page-locked memory, with one synchronisation before ``stage`` returns.
"""

from __future__ import annotations

import contextlib
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
from torchsnapshot.io_preparer import PrimitivePreparer
from torchsnapshot.manifest import (
    Entry,
    ObjectEntry,
    Shard,
    ShardedTensorEntry,
    SnapshotMetadata,
    TensorEntry,
)
from torchsnapshot.serialization import dtype_to_string

from ..format.chain_link import (
    CHAIN_ENTRY,
    ChainLink,
    DeltaTensor,
    delta_rows_path,
    delta_values_path,
    new_link_id,
)
from ..format.layout import batched_file_name, delta_file_name
from .incremental import MAX_CHAIN_FRACTION, changed_rows, row_bytes
from .pinned import PinnedRegistration
from .save_plan import SavePlan, TensorSlot, is_sharded


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
    # Several ranks: every rank's vote in, the sums out (the same on every rank), so that all
    # ranks write a delta or all write a full checkpoint. None: this process alone.
    agree: Callable[[ChainVote], ChainVote] | None = None


@dataclass(frozen=True)
class ChainVote:
    """One rank's (or, summed, the job's) case for a delta: can it be one, and its bytes."""

    has_parent: bool  # it compared with its parent's values (a delta is possible)
    delta_bytes: int  # changed rows and their indices
    dense_bytes: int  # what a delta writes besides the rows
    full_bytes: int  # what a full checkpoint writes

    @staticmethod
    def total(votes: list[ChainVote]) -> ChainVote:
        return ChainVote(
            has_parent=all(vote.has_parent for vote in votes),
            delta_bytes=sum(vote.delta_bytes for vote in votes),
            dense_bytes=sum(vote.dense_bytes for vote in votes),
            full_bytes=sum(vote.full_bytes for vote in votes),
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
        # Page-locked for CUDA copies (unregistered before the block is freed).
        self._pinned = PinnedRegistration(self.memory, plan.size) if plan.on_cuda else None
        self._free = weakref.finalize(self, _free_block, self.memory, on_free, self._pinned)
        block = torch.frombuffer(self.memory.buf, dtype=torch.uint8, count=plan.size)
        self._slots = {slot.key: slot for slot in plan.slots}
        self._views = {
            slot.key: block[slot.offset : slot.offset + slot.nbytes]
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
        chain: ChainRequest | None = None,
    ) -> StagedSave:
        """Copy the tensors in (the caller may change them as soon as this returns) and
        describe everything else; ``containers`` and ``leaves`` come from :func:`flatten_state`.

        ``chain`` (incremental saves): with a parent, each chained tensor is compared with its
        staged copy (the parent's values) and only the changed rows are copied and written;
        the save is full instead when those rows would take the chain past
        ``chain.max_chain_fraction`` of a full checkpoint, or when the delta would write at least
        as many bytes as a full save.
        """
        data_file = batched_file_name()  # fresh per attempt (see the function)
        manifest: dict[str, Entry] = dict(containers)
        objects: dict[str, bytes] = {}
        changed, vote = self._stage_chained(leaves, chain) if chain else (None, None)
        for slot in self.plan.slots:
            if changed is not None and slot.chained:
                continue  # its changed rows were staged above; described below
            source = slot.source(leaves[slot.path])
            self._views[slot.key].copy_(source, non_blocking=source.is_cuda)
        if self._pinned is not None:
            self._pinned.synchronize()  # every device-to-host copy has landed
        for path, value in leaves.items():
            if is_sharded(value):
                if changed is not None and path in self.plan.chained_leaves:
                    continue  # described by the chain below (on every rank alike)
                manifest[path] = self._sharded_entry(path, value, data_file)
            elif isinstance(value, torch.Tensor):
                placed = self._slots.get(path)
                if placed is None:
                    continue  # replicated, saved by rank 0 for every rank
                if changed is not None and placed.chained:
                    continue  # described by the chain below
                manifest[path] = _tensor_entry(
                    data_file, placed.dtype, list(placed.shape), placed.offset, placed.replicated
                )
            elif PrimitivePreparer.should_inline(value):
                manifest[path] = PrimitivePreparer.prepare_write(value)
            else:
                location = f"{self.plan.rank}/{path}"
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
        if chain is not None and vote is not None:
            self._describe_chain(staged, manifest, chain, changed, vote)
        rank = self.plan.rank
        staged.metadata = SnapshotMetadata(
            version=torchsnapshot.__version__,
            world_size=self.plan.world_size,
            manifest={f"{rank}/{path}": entry for path, entry in manifest.items()},
        ).to_yaml()
        return staged

    def _sharded_entry(self, path: str, value: Any, data_file: str) -> ShardedTensorEntry:
        """This rank's shards of a sharded tensor, each placed in the global tensor (a rank
        that holds none of it, as under a table-wise plan, lists no shard)."""
        shards = []
        for index in range(len(value.local_shards())):
            slot = self._slots[f"{path}#{index}"]
            shards.append(
                Shard(
                    offsets=list(slot.offsets),
                    sizes=list(slot.shape),
                    tensor=_tensor_entry(data_file, slot.dtype, list(slot.shape), slot.offset),
                )
            )
        return ShardedTensorEntry(shards=shards)

    def _stage_chained(
        self, leaves: Mapping[str, Any], chain: ChainRequest
    ) -> tuple[dict[str, torch.Tensor] | None, ChainVote]:
        """Stage the changed rows of every chained tensor; ``({slot key: row indices}, the
        job's vote)``, or ``(None, vote)`` when a full save is due (then everything is copied
        in whole). Every rank votes, even one that cannot write a delta: all ranks decide
        together."""
        parent = chain.parent_link
        compare = parent is not None and parent.depth + 1 < chain.full_every
        changed: dict[str, torch.Tensor] = {}
        delta_bytes = 0
        for slot in self.plan.chained if compare else ():
            value, staged = slot.source(leaves[slot.path]), self._views[slot.key]
            rows = changed_rows(value, staged)
            if rows.numel():
                staged.index_copy_(0, rows, value.index_select(0, rows))
            changed[slot.key] = rows
            delta_bytes += rows.numel() * (8 + row_bytes(slot.shape, value.element_size()))
        own = ChainVote(
            has_parent=compare,
            delta_bytes=delta_bytes,
            dense_bytes=sum(slot.nbytes for slot in self.plan.slots if not slot.chained),
            full_bytes=sum(slot.nbytes for slot in self.plan.slots),
        )
        vote = chain.agree(own) if chain.agree is not None else own
        if not vote.has_parent or parent is None:
            return None, vote  # a full save is due: every tensor is copied whole
        if parent.chain_bytes + vote.delta_bytes > chain.max_chain_fraction * parent.full_bytes:
            return None, vote  # the staged copies are current: the full save writes them
        if vote.dense_bytes + vote.delta_bytes >= vote.full_bytes:
            # A delta of (nearly) every row, indices on top, weighs as much as a full save:
            # written full, whatever the chain's budget (docs/incremental.md).
            return None, vote
        for slot in self.plan.chained:
            rows = changed[slot.key]
            self._rows_view(slot)[: rows.numel()].copy_(rows)
        return changed, vote

    def _rows_view(self, slot: TensorSlot) -> torch.Tensor:
        block = torch.frombuffer(self.memory.buf, dtype=torch.uint8, count=self.plan.size)
        return block[slot.rows_offset : slot.rows_offset + slot.shape[0] * 8].view(torch.int64)

    def _describe_chain(
        self,
        staged: StagedSave,
        manifest: dict[str, Entry],
        chain: ChainRequest,
        changed: dict[str, torch.Tensor] | None,
        vote: ChainVote,
    ) -> None:
        """Add the chain link (and, for a delta, the rows/values entries) to the manifest.

        The link's byte counts are the job's (``vote``: summed over ranks), its tensors this
        rank's; rank 0 lists every rank's tensors when it commits
        (:func:`~tml_checkpointing.writing.rank_commit.merge_metadata`)."""
        parent = chain.parent_link
        if changed is None or parent is None:
            staged.link = ChainLink(
                id=new_link_id(),
                parent=None,
                parent_id=None,
                depth=0,
                written_bytes=vote.full_bytes,
                full_bytes=vote.full_bytes,
                chain_bytes=0,
            )
            manifest[CHAIN_ENTRY] = staged.link.entry()
            return
        staged.delta_file = delta_file_name()
        staged.data_size = self.plan.dense_size
        offset, tensors = 0, []
        for index, slot in enumerate(self.plan.chained):
            rows = changed[slot.key]
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
            tensors.append(
                DeltaTensor(
                    slot.path,
                    dtype_to_string(slot.dtype),
                    slot.shape,
                    count,
                    offsets=slot.offsets,
                    size=slot.global_shape,
                    rank=self.plan.rank,
                    index=index,
                )
            )
        staged.link = ChainLink(
            id=new_link_id(),
            parent=chain.parent,
            parent_id=parent.id,
            depth=parent.depth + 1,
            written_bytes=vote.dense_bytes + vote.delta_bytes,
            full_bytes=vote.full_bytes,
            chain_bytes=parent.chain_bytes + vote.delta_bytes,
            tensors=tuple(tensors),
        )
        manifest[CHAIN_ENTRY] = staged.link.entry()

    def close(self) -> None:
        """Free the block now (the writer process unmaps its own mapping on its next command)."""
        self._views.clear()
        self._free()


def _free_block(
    memory: shared_memory.SharedMemory,
    on_free: Callable[[str], None] | None,
    pinned: PinnedRegistration | None,
) -> None:
    """Unlink the block; unmap it here unless tensor views still point into it (then the
    mapping goes with them). Runs from finalizers too: must not raise, must not block."""
    if pinned is not None:
        pinned.release()
    with contextlib.suppress(FileNotFoundError):
        memory.unlink()
    with contextlib.suppress(BufferError):
        memory.close()
    if on_free is not None:
        on_free(memory.name)


def _tensor_entry(
    location: str, dtype: torch.dtype, shape: list[int], start: int, replicated: bool = False
) -> TensorEntry:
    nbytes = dtype.itemsize
    for size in shape:
        nbytes *= size
    return TensorEntry(
        location=location,
        serializer="buffer_protocol",
        dtype=dtype_to_string(dtype),
        shape=shape,
        replicated=replicated,
        byte_range=[start, start + nbytes],
    )
