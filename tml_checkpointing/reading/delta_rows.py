"""Applying one delta piece's changed rows to what this process holds of a tensor.

Why a region view: a delta piece is one saved shard's changed rows (or a whole tensor's), with
the shard's place in the global tensor (:class:`~tml_checkpointing.format.chain_link
.DeltaTensor`). The process restoring it may hold the whole tensor (one process, the
evaluator, ``load_snapshot_to_weight``), the same shard, or other rows and columns entirely
(another plan, another number of ranks). Each holding is a *region*: its offsets in the global
tensor and its local tensor. A row of the piece lands in every region that holds it, clipped
to the columns both have; rows that land nowhere here belong to another rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchsnapshot.manifest import ShardedTensorEntry, TensorEntry

from ..format.chain_link import DeltaTensor

Region = tuple[tuple[int, ...], torch.Tensor]  # (offsets in the global tensor, local tensor)


def regions_of(target: Any) -> list[Region] | None:
    """What this process holds of ``target``: a plain tensor whole, a ``ShardedTensor`` as its
    local shards; ``None`` for anything else (nothing to patch in place)."""
    if type(target).__name__ == "ShardedTensor" and hasattr(target, "local_shards"):
        return [
            (tuple(int(o) for o in piece.metadata.shard_offsets), piece.tensor)
            for piece in target.local_shards()
        ]
    if isinstance(target, torch.Tensor):
        return [((0,) * target.dim(), target)]
    return None


def apply_delta(
    piece: DeltaTensor, rows: torch.Tensor, values: torch.Tensor, regions: Sequence[Region]
) -> None:
    """Write the piece's changed ``rows`` (the shard's own row numbers) and their ``values``
    into every region that holds them."""
    if not rows.numel():
        return
    global_rows = rows + piece.row_offset
    column_start = piece.column_offset
    width = piece.shape[1] if len(piece.shape) > 1 else 0
    for offsets, local in regions:
        row_start = offsets[0] if offsets else 0
        inside = (global_rows >= row_start) & (global_rows < row_start + local.shape[0])
        if not bool(inside.any()):
            continue
        local_rows = global_rows[inside] - row_start
        landed = values[inside]
        if local.dim() <= 1:
            local.index_copy_(0, local_rows, landed.to(local.dtype))
            continue
        local_start = offsets[1] if len(offsets) > 1 else 0
        first = max(column_start, local_start)
        last = min(column_start + width, local_start + local.shape[1])
        if first >= last:
            continue
        source = landed[:, first - column_start : last - column_start]
        if first == local_start and last == local_start + local.shape[1]:
            local.index_copy_(0, local_rows, source.to(local.dtype))
        else:
            columns = local[:, first - local_start : last - local_start]
            columns.index_copy_(0, local_rows, source.to(local.dtype))


def covers(piece: DeltaTensor, global_shape: Sequence[int]) -> bool:
    """Whether a piece fits inside a tensor of ``global_shape`` (a sanity check before any
    byte lands: a piece from another tensor's layout means the chain does not fit)."""
    if list(piece.global_shape) != list(global_shape):
        return False
    for axis, offset in enumerate(piece.offsets):
        if offset + piece.shape[axis] > global_shape[axis]:
            return False
    return True


def entry_global_shape(entry: TensorEntry | ShardedTensorEntry) -> list[int]:
    """The whole tensor's shape: a plain entry's, or the far corner of a sharded one's shards."""
    if isinstance(entry, TensorEntry):
        return [int(size) for size in entry.shape]
    extent: list[int] = []
    for shard in entry.shards:
        ends = [int(o) + int(n) for o, n in zip(shard.offsets, shard.sizes, strict=True)]
        extent = ends if not extent else [max(a, b) for a, b in zip(extent, ends, strict=True)]
    return extent


def entry_dtype(entry: TensorEntry | ShardedTensorEntry) -> str:
    """The saved dtype's name (a sharded entry's shards all have their tensor's)."""
    if isinstance(entry, TensorEntry):
        return entry.dtype
    return entry.shards[0].tensor.dtype if entry.shards else ""
