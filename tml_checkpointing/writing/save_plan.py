"""Which tensors a save stages, and where each goes in the staging block: one rank's plan.

Why a plan: the staging block is allocated once and reused, so the layout is decided once per
state layout (paths, dtypes, shapes, local shards) and every save is a copy into it.

What one rank stages is its *local* state, and nothing twice across ranks:

* plain tensors (CPU or CUDA, buffer-protocol dtypes) whole;
* a ``ShardedTensor`` (TorchRec tables, fused optimizer state) as its local shards, each with
  its place in the global tensor, so that the checkpoint's shards of all ranks make up the
  tensor and any rank of any later job can read the rows it owns;
* the replicated dense part once: in a job of several ranks, a plain tensor of a stateful
  that also holds sharded tensors (a ``DistributedModelParallel`` model, its
  ``CombinedOptimizer``) is the data-parallel part, identical on every rank; rank 0 stages it
  (marked ``replicated``, as torchsnapshot marks DDP's) and the other ranks leave it out.
  Everything else (RNG state, per-rank objects) every rank saves for itself.

Anything else (DTensor, quantized or sparse tensors) makes :func:`plan_save` return ``None``,
and the save goes through torchsnapshot as before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torchsnapshot
from torchsnapshot.flatten import flatten
from torchsnapshot.manifest import Entry
from torchsnapshot.serialization import BUFFER_PROTOCOL_SUPPORTED_DTYPES

from .incremental import MIN_CHAINED_BYTES, MIN_CHAINED_ROWS, is_chainable

ALIGNMENT = 4096  # every tensor starts on a page: direct I/O and page-sized reads stay aligned

PlanKey = tuple[tuple[Any, ...], ...]


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor (or one local shard of a sharded tensor) lives in the staging block."""

    path: str  # the leaf's logical path, e.g. model/weight (a shard's: its sharded tensor's)
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    rows_offset: int = -1  # chained (incremental): where its changed-row indices are staged
    shard: int = -1  # index in the leaf's ``local_shards()``; -1: a plain tensor
    offsets: tuple[int, ...] = ()  # a shard's place in the global tensor
    global_shape: tuple[int, ...] = ()  # a shard's whole tensor
    replicated: bool = False  # the same on every rank: rank 0 saves it for all
    device: str = "cpu"

    @property
    def chained(self) -> bool:
        return self.rows_offset >= 0

    @property
    def key(self) -> str:
        """Unique within a plan: a sharded tensor has one slot per local shard."""
        return self.path if self.shard < 0 else f"{self.path}#{self.shard}"

    def source(self, leaf: Any) -> torch.Tensor:
        """The tensor this slot copies from, given the leaf at :attr:`path`."""
        if self.shard < 0:
            return leaf.detach()  # type: ignore[no-any-return]
        return leaf.local_shards()[self.shard].tensor.detach()  # type: ignore[no-any-return]


@dataclass
class SavePlan:
    """One rank's tensors laid out in one block; reused while the layout does not change."""

    slots: list[TensorSlot]
    size: int  # bytes of the block, aligned
    key: PlanKey = field(repr=False)
    # The data file of a full save is the block's first ``full_size`` bytes; a delta save
    # writes the first ``dense_size`` (the tensors that are never chained come first).
    full_size: int = 0
    dense_size: int = 0
    rank: int = 0
    world_size: int = 1
    left_out: frozenset[str] = frozenset()  # replicated leaves another rank (0) saves
    chained_leaves: frozenset[str] = frozenset()  # saved as changed rows in a chain

    @property
    def chained(self) -> list[TensorSlot]:
        return [slot for slot in self.slots if slot.chained]

    @property
    def on_cuda(self) -> bool:
        return any(slot.device != "cpu" for slot in self.slots)


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


def is_sharded(value: Any) -> bool:
    """A ``torch.distributed`` ``ShardedTensor`` (what TorchRec's sharded modules hold)."""
    return type(value).__name__ == "ShardedTensor" and hasattr(value, "local_shards")


def global_size(value: Any) -> tuple[int, ...]:
    """A sharded tensor's whole shape, from its metadata (its ``size()`` warns of
    ShardedTensor's deprecation into every rank's log, on every save)."""
    return tuple(int(extent) for extent in value.metadata().size)


def replicated_leaves(leaves: Mapping[str, Any], world_size: int) -> frozenset[str]:
    """The plain tensors that are the data-parallel part of a sharded stateful (see above)."""
    if world_size <= 1:
        return frozenset()
    sharded_roots = {path.split("/", 1)[0] for path, value in leaves.items() if is_sharded(value)}
    return frozenset(
        path
        for path, value in leaves.items()
        if path.split("/", 1)[0] in sharded_roots
        and isinstance(value, torch.Tensor)
        and not is_sharded(value)
    )


def plan_save(
    leaves: Mapping[str, Any],
    incremental: bool = False,
    min_chained_bytes: int = MIN_CHAINED_BYTES,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> SavePlan | None:
    """The block layout for ``leaves``' tensors, or ``None`` if some leaf needs torchsnapshot.

    ``incremental``: large row-shaped CPU tensors and shards
    (:func:`~tml_checkpointing.writing.incremental.is_chainable`) go after all the others,
    each with room for its changed-row indices at the end of the block, so a delta save
    writes one prefix of the block plus the rows.
    """
    replicated = replicated_leaves(leaves, world_size)
    left_out = frozenset(replicated) if rank != 0 else frozenset()
    slots: list[TensorSlot] = []
    # With several ranks only what every reader finds the same way is chained: shards, and
    # the replicated part (rank 0's); a rank's own plain tensors are written whole.
    chained_leaves = (
        {
            p
            for p, v in leaves.items()
            if p not in left_out
            and (world_size == 1 or is_sharded(v) or p in replicated)
            and _chainable(v, min_chained_bytes)
        }
        if incremental
        else set()
    )
    chained: set[str] = set()
    for slot, _ in _slots_of(leaves, replicated, left_out):
        if slot is None:
            return None
        if slot.path in chained_leaves:
            chained.add(slot.key)
        slots.append(slot)
    slots.sort(key=lambda slot: slot.key in chained)  # stable: never-chained first
    offset = 0
    for index, slot in enumerate(slots):
        slots[index] = dataclasses.replace(slot, offset=offset)
        offset += _aligned(slot.nbytes)
    dense_size = sum(_aligned(s.nbytes) for s in slots if s.key not in chained)
    full_size = offset
    for index, slot in enumerate(slots):
        if slot.key in chained:
            slots[index] = dataclasses.replace(slot, rows_offset=offset)
            offset += _aligned(slot.shape[0] * 8)
    return SavePlan(
        slots=slots,
        size=max(offset, ALIGNMENT),
        key=plan_key(leaves),
        full_size=max(full_size, ALIGNMENT),
        dense_size=dense_size,
        rank=rank,
        world_size=world_size,
        left_out=left_out,
        chained_leaves=frozenset(chained_leaves),
    )


def _chainable(value: Any, min_bytes: int) -> bool:
    """Whether a leaf is saved as changed rows in a chain: a large row-shaped CPU tensor, or
    a sharded tensor whose *global* size is (decided from the global size, so that every
    rank decides the same: a delta checkpoint leaves the whole tensor's entry out)."""
    if not is_sharded(value):
        return is_chainable(value, min_bytes) and value.device.type == "cpu"
    pieces = value.local_shards()
    if any(piece.tensor.device.type != "cpu" for piece in pieces):
        return False  # a GPU rank's shards: compared on the host would cost a full copy
    size = global_size(value)
    numel = 1
    for extent in size:
        numel *= extent
    element = torch.empty((), dtype=value.metadata().tensor_properties.dtype).element_size()
    return len(size) >= 1 and size[0] >= MIN_CHAINED_ROWS and numel * element >= min_bytes


def _slots_of(
    leaves: Mapping[str, Any], replicated: frozenset[str], left_out: frozenset[str]
) -> Iterator[tuple[TensorSlot | None, torch.Tensor | None]]:
    """One unplaced slot per tensor to stage (offset 0); ``(None, None)``: not stageable."""
    for path, value in leaves.items():
        if path in left_out:
            continue
        if is_sharded(value):
            for index, piece in enumerate(value.local_shards()):
                tensor = piece.tensor
                if not _stageable(tensor):
                    yield None, None
                    return
                offsets = tuple(int(o) for o in piece.metadata.shard_offsets)
                slot = _slot(path, tensor, shard=index, offsets=offsets)
                yield dataclasses.replace(slot, global_shape=global_size(value)), tensor
        elif isinstance(value, torch.Tensor):
            if not _stageable(value):
                yield None, None
                return
            yield _slot(path, value, replicated=path in replicated), value
        elif _needs_torchsnapshot(value):
            yield None, None
            return


def _slot(
    path: str,
    tensor: torch.Tensor,
    *,
    shard: int = -1,
    offsets: tuple[int, ...] = (),
    replicated: bool = False,
) -> TensorSlot:
    return TensorSlot(
        path=path,
        dtype=tensor.dtype,
        shape=tuple(tensor.shape),
        offset=0,
        nbytes=tensor.numel() * tensor.element_size(),
        shard=shard,
        offsets=offsets,
        replicated=replicated,
        device=str(tensor.device),
    )


def plan_key(leaves: Mapping[str, Any]) -> PlanKey:
    """What a plan depends on: the tensors' paths, dtypes, shapes, devices and local shards
    (cheap to compare; a re-sharded model gets a new plan)."""
    key: list[tuple[Any, ...]] = []
    for path, value in leaves.items():
        if is_sharded(value):
            shards = tuple(
                (tuple(piece.metadata.shard_offsets), tuple(piece.tensor.shape), piece.tensor.dtype)
                for piece in value.local_shards()
            )
            key.append((path, "sharded", global_size(value), shards))
        elif isinstance(value, torch.Tensor):
            key.append((path, str(value.dtype), tuple(value.shape), str(value.device)))
    return tuple(key)


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT if nbytes else 0


def _stageable(tensor: torch.Tensor) -> bool:
    plain = type(tensor) is torch.Tensor or type(tensor) is torch.nn.Parameter
    return (
        plain
        and tensor.device.type in ("cpu", "cuda")
        and tensor.layout == torch.strided
        and not tensor.is_quantized
        and tensor.dtype in BUFFER_PROTOCOL_SUPPORTED_DTYPES
    )


def _needs_torchsnapshot(value: Any) -> bool:
    """Leaves torchsnapshot treats specially (distributed tensors we do not stage)."""
    return type(value).__name__ in {"ShardedTensor", "DTensor"}
