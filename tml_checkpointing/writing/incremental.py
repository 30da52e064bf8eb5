"""Incremental checkpoints: the rows of large tensors that changed since the chain's last save.

Why rows: in recommendation models the embedding tables are most of the state, and between
two checkpoints only the rows of the ids seen change (row-wise optimizers, sparse gradients).
Ids are hashed over the table, so changed rows are scattered: with 5% of rows changed, almost
every 1 MiB block holds one, and block-level deduplication would save nothing.

How: the writer's staging block already holds the last saved copy of every tensor. A save in
a chain compares each large tensor with that copy row by row (bitwise, vectorised), copies only
the changed rows in, and writes their indices and values as two ordinary tensors of the
checkpoint. The tensor's own manifest entry is left out; the checkpoint's chain link (below)
says which earlier checkpoint holds the rest.

The link format a delta records: :mod:`tml_checkpointing.format.chain_link`.
"""

from __future__ import annotations

from typing import Any

import torch

#: Tensors smaller than this are written whole in every save (dense layers, biases, scalars);
#: ``Snapshot(min_chained_bytes=...)`` changes it.
MIN_CHAINED_BYTES = 1024 * 1024
#: A chained tensor has at least this many rows (one index of 8 bytes per changed row).
MIN_CHAINED_ROWS = 16
#: Default number of saves per chain: every ``full_every``-th save is a full checkpoint.
DEFAULT_FULL_EVERY = 10
#: A chain's deltas may add up to this fraction of a full checkpoint; the save that would
#: pass it is a full one instead. Bounds a restore's extra reads (the newest checkpoint of a
#: chain reads at most 1.5x the bytes of a full one) and what one corrupt full checkpoint
#: can take down with it.
MAX_CHAIN_FRACTION = 0.5
#: Rows compared per step of :func:`changed_rows`: large steps (few calls, each vectorised
#: over the cores), bounded temporary memory (one byte per 8-byte word compared).
COMPARE_ROWS = 1 << 20


def is_chainable(value: Any, min_bytes: int = MIN_CHAINED_BYTES) -> bool:
    """Whether a tensor is large enough, and row-shaped, to be saved as changed rows."""
    return (
        type(value) in (torch.Tensor, torch.nn.Parameter)
        and value.dim() >= 1
        and value.shape[0] >= MIN_CHAINED_ROWS
        and value.numel() * value.element_size() >= min_bytes
    )


def _bitwise(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's rows as the widest integer words that tile a row: a bitwise compare
    (``-0.0`` and ``0.0`` differ, a NaN equals itself) whatever the dtype, and 8-byte words
    compare ~2x faster than 4-byte ones (the compare is memory-bound)."""
    rows = tensor.contiguous().reshape(tensor.shape[0], -1)
    raw = rows.view(torch.uint8) if rows.dtype == torch.bool else rows
    if raw.dtype.is_complex:
        raw = torch.view_as_real(raw).reshape(raw.shape[0], -1)
    raw = raw.view(torch.uint8)
    for width, integer in ((8, torch.int64), (4, torch.int32), (2, torch.int16)):
        if raw.shape[1] % width == 0:
            return raw.view(integer)
    return raw


def changed_rows(current: torch.Tensor, saved: torch.Tensor) -> torch.Tensor:
    """Indices (int64, ascending) of the rows of ``current`` that differ from ``saved``."""
    if current.shape != saved.shape or current.dtype != saved.dtype:
        raise ValueError(
            f"cannot compare a {current.dtype} {list(current.shape)} tensor with a saved "
            f"{saved.dtype} {list(saved.shape)} one"
        )
    new, old = _bitwise(current.detach()), _bitwise(saved)
    found = []
    for start in range(0, new.shape[0], COMPARE_ROWS):
        stop = min(start + COMPARE_ROWS, new.shape[0])
        differs = torch.ne(new[start:stop], old[start:stop])
        if differs.shape[1] % 8 == 0:  # 8 flags per int64: an 8x shorter reduction
            differs = differs.view(torch.uint8).view(torch.int64)
        found.append(differs.any(dim=1).nonzero().squeeze(1) + start)
    return torch.cat(found) if found else torch.empty(0, dtype=torch.int64)


def row_bytes(shape: tuple[int, ...] | list[int], element_size: int) -> int:
    count = 1
    for size in shape[1:]:
        count *= size
    return count * element_size
