"""Which bytes of a saved sharded tensor land where in this rank's local shards.

Why: a sharded tensor (a TorchRec table, its fused optimizer state) is saved as one entry per
saving rank, each listing that rank's shards: offsets, sizes and where the shard's bytes are
(a whole file, or a byte range of a ``batched/`` file). A rank restoring it holds the same
rows, or others (another plan, another world size); either way it needs only the bytes of the
rows it holds now, not every shard read whole and copied (torchsnapshot's way).

A shard is row-major, so the rows of a saved shard that a local shard also holds are one
contiguous byte range of it. When both shards span the same columns (row-wise and table-wise
plans, 1-D optimizer state) those bytes land in the local shard as they are. When either side
is split by columns (column-wise plans), the overlap is a rectangle: the overlapping rows are
read whole into scratch and the rectangle copied out of them.

Only what lands exactly is planned: plain (``buffer_protocol``) shards of the target's dtype,
a target of the saved global shape, local shards that are contiguous CPU tensors. Anything else
gives ``None``, before anything is read, and the caller leaves the restore to torchsnapshot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed._shard.sharded_tensor.api import ShardedTensor
from torchsnapshot.manifest import ShardedTensorEntry, TensorEntry
from torchsnapshot.serialization import Serializer, string_to_dtype


@dataclass(frozen=True)
class ShardPiece:
    """Bytes ``[start, end)`` of ``location``: whole rows of one saved shard, for one local shard.

    ``rows is None``: the bytes are ``destination``'s own (a contiguous view of the local
    shard). Otherwise they are rows of shape ``rows`` whose rectangle ``window`` (per dimension
    after the first: ``(start, length)``) goes into ``destination``, a strided view.
    """

    location: str
    start: int
    end: int
    destination: torch.Tensor
    rows: tuple[int, ...] | None = None
    window: tuple[tuple[int, int], ...] = ()

    def scatter(self, scratch: torch.Tensor) -> None:
        """Copy the rectangle out of ``scratch`` (the piece's bytes, ``uint8``)."""
        assert self.rows is not None
        source = scratch.view(self.destination.dtype).view(self.rows)
        for dim, (first, length) in enumerate(self.window, start=1):
            source = source.narrow(dim, first, length)
        self.destination.copy_(source)


def is_sharded(value: Any) -> bool:
    """A tensor whose ``state_dict`` value is a distributed wrapper, not a plain tensor."""
    return isinstance(value, torch.Tensor) and type(value).__name__ in {"ShardedTensor", "DTensor"}


def plan_shards(entry: ShardedTensorEntry, target: Any) -> list[ShardPiece] | None:
    """The byte ranges that fill ``target``'s local shards from the saved ``entry`` (every
    rank's shards, merged), or ``None`` when they cannot land exactly."""
    held = _local_shards(target)
    if held is None or not entry.shards or _global_shape(entry) != held[0]:
        return None
    pieces: list[ShardPiece] = []
    for saved in entry.shards:
        stored = saved.tensor
        if type(stored) is not TensorEntry or stored.serializer != Serializer.BUFFER_PROTOCOL.value:
            return None
        sizes = [int(size) for size in saved.sizes]
        if not sizes or [int(size) for size in stored.shape] != sizes:
            return None
        try:
            dtype = string_to_dtype(stored.dtype)
        except (KeyError, ValueError, AttributeError):  # a dtype this torch does not know
            return None
        row_bytes = math.prod(sizes[1:]) * _itemsize(dtype)
        base, stop = stored.byte_range or (0, sizes[0] * row_bytes)
        if stop - base != sizes[0] * row_bytes:
            return None
        for offsets, local in held[1]:
            overlap = _overlap([int(o) for o in saved.offsets], sizes, offsets, list(local.shape))
            if overlap is None:
                continue
            if local.dtype != dtype:
                return None
            pieces.append(_piece(stored.location, base, row_bytes, sizes, local, overlap))
    return pieces


def _piece(
    location: str,
    base: int,
    row_bytes: int,
    sizes: list[int],
    local: torch.Tensor,
    overlap: list[tuple[int, int, int]],
) -> ShardPiece:
    """The piece for one overlap ``[(saved start, local start, length)]`` per dimension."""
    (saved_row, local_row, count), rest = overlap[0], overlap[1:]
    start = base + saved_row * row_bytes
    end = start + count * row_bytes
    whole_rows = all(
        saved_first == 0 and local_first == 0 and length == sizes[dim] == local.shape[dim]
        for dim, (saved_first, local_first, length) in enumerate(rest, start=1)
    )
    if whole_rows:  # the rows' bytes are the local shard's own: they land as they are
        return ShardPiece(location, start, end, local.narrow(0, local_row, count))
    destination = local
    for dim, (_, local_first, length) in enumerate(overlap):
        destination = destination.narrow(dim, local_first, length)
    window = tuple((saved_first, length) for saved_first, _, length in rest)
    return ShardPiece(location, start, end, destination, (count, *sizes[1:]), window)


def _local_shards(target: Any) -> tuple[list[int], list[tuple[list[int], torch.Tensor]]] | None:
    """``(global shape, [(offsets, tensor)])`` of what this rank holds of ``target``, when
    bytes can be copied into those tensors as they are."""
    if type(target) is ShardedTensor:
        shape = [int(size) for size in target.metadata().size]  # .size(): a FutureWarning
        held = [
            ([int(o) for o in shard.metadata.shard_offsets], shard.tensor)
            for shard in target.local_shards()
        ]
        if any(
            list(shard.tensor.shape) != [int(s) for s in shard.metadata.shard_sizes]
            for shard in target.local_shards()
        ):
            return None
    elif type(target) in (torch.Tensor, torch.nn.Parameter):  # a whole table, unsharded
        shape = [int(size) for size in target.shape]
        held = [([0] * len(shape), target.detach())]
    else:
        return None
    for _, tensor in held:
        if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.is_quantized:
            return None
    return shape, held


def _global_shape(entry: ShardedTensorEntry) -> list[int]:
    """The saved tensor's shape: the far corner of its shards (as torchsnapshot computes it)."""
    shape = [0] * len(entry.shards[0].sizes)
    for shard in entry.shards:
        if len(shard.sizes) != len(shape):
            return []
        for dim, (offset, size) in enumerate(zip(shard.offsets, shard.sizes, strict=True)):
            shape[dim] = max(shape[dim], int(offset) + int(size))
    return shape


def _overlap(
    saved_offsets: list[int], saved_sizes: list[int], offsets: list[int], sizes: list[int]
) -> list[tuple[int, int, int]] | None:
    """Per dimension ``(start in the saved shard, start in the local shard, length)`` of the
    two shards' common box, or ``None`` when they do not overlap."""
    if len(offsets) != len(saved_offsets):
        return None
    overlap: list[tuple[int, int, int]] = []
    for saved_at, saved_size, at, size in zip(
        saved_offsets, saved_sizes, offsets, sizes, strict=True
    ):
        first, last = max(saved_at, at), min(saved_at + saved_size, at + size)
        if last <= first:
            return None
        overlap.append((first - saved_at, first - at, last - first))
    return overlap


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
