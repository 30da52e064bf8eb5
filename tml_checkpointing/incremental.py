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

In the torchsnapshot manifest of rank 0 (``<rank>/tml_delta/...``, a key no state uses)::

    0/tml_delta/chain      str: the ChainLink as JSON (id, parent step, parent id, depth, ...)
    0/tml_delta/<i>/rows   int64 [n]: indices of the changed rows of tensor i of the link
    0/tml_delta/<i>/values [n, ...]: their values

A tensor's value at checkpoint ``k`` is its full value at the nearest ancestor that stored it
whole, with every delta from there to ``k`` applied in order. Every save of an incremental
Snapshot records a link (a full one has no parent), so a delta can prove that its parent is
the checkpoint it was computed against: a parent deleted and saved again under the same step
has another id, and the delta is then reported corrupt rather than restored wrong.

Plain ``torchsnapshot.Snapshot(path).restore`` cannot rebuild a delta checkpoint (the chained
tensors come back as ``None``, and ``load_state_dict`` refuses them); :func:`~tml_checkpointing
.materialize.materialize` rewrites any checkpoint as a full, plain one.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torchsnapshot.manifest import Entry, PrimitiveEntry, TensorEntry

DELTA_ROOT = "tml_delta"
CHAIN_ENTRY = f"{DELTA_ROOT}/chain"
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


def delta_rows_path(index: int) -> str:
    return f"{DELTA_ROOT}/{index}/rows"


def delta_values_path(index: int) -> str:
    return f"{DELTA_ROOT}/{index}/values"


@dataclass(frozen=True)
class DeltaTensor:
    """One tensor a checkpoint stores as changed rows: its logical path, dtype and shape."""

    path: str  # logical path without the rank, e.g. model/user.weight
    dtype: str
    shape: tuple[int, ...]
    rows: int  # how many rows changed (and were written)


@dataclass(frozen=True)
class ChainLink:
    """Where a checkpoint sits in its chain; stored in its manifest as :data:`CHAIN_ENTRY`."""

    id: str  # fresh per save: what a child names as its parent
    parent: str | None  # step name of the parent checkpoint (a sibling), None: a full one
    parent_id: str | None
    depth: int  # deltas since the chain's full checkpoint (0: this one is full)
    written_bytes: int  # bytes of tensor data this checkpoint wrote
    full_bytes: int  # bytes of tensor data a full checkpoint of this state writes
    chain_bytes: int  # bytes written by the chain's deltas up to this one
    tensors: tuple[DeltaTensor, ...] = field(default=())

    @property
    def is_delta(self) -> bool:
        return self.parent is not None

    def to_json(self) -> str:
        return json.dumps({"version": 1, **asdict(self)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ChainLink:
        raw = json.loads(text)
        tensors = tuple(
            DeltaTensor(t["path"], t["dtype"], tuple(t["shape"]), int(t["rows"]))
            for t in raw.get("tensors", [])
        )
        return cls(
            id=str(raw["id"]),
            parent=raw.get("parent"),
            parent_id=raw.get("parent_id"),
            depth=int(raw["depth"]),
            written_bytes=int(raw["written_bytes"]),
            full_bytes=int(raw["full_bytes"]),
            chain_bytes=int(raw["chain_bytes"]),
            tensors=tensors,
        )

    def entry(self) -> PrimitiveEntry:
        return PrimitiveEntry(type="str", serialized_value=self.to_json(), replicated=False)


def new_link_id() -> str:
    return uuid.uuid4().hex


def chain_link(manifest: Mapping[str, Entry]) -> ChainLink | None:
    """The chain link of one rank's manifest (logical paths, as ``manifest_of_rank`` gives
    them); ``None`` if it has none."""
    entry = manifest.get(CHAIN_ENTRY)
    if entry is None:
        return None
    if not isinstance(entry, PrimitiveEntry) or entry.type != "str":
        raise ValueError(f"{CHAIN_ENTRY} is not a string entry")
    return ChainLink.from_json(entry.serialized_value)


def delta_entries(
    manifest: Mapping[str, Entry], link: ChainLink
) -> dict[str, tuple[TensorEntry, TensorEntry]]:
    """``{logical path: (rows entry, values entry)}`` of a delta checkpoint's tensors."""
    found = {}
    for index, tensor in enumerate(link.tensors):
        rows = manifest.get(delta_rows_path(index))
        values = manifest.get(delta_values_path(index))
        if not isinstance(rows, TensorEntry) or not isinstance(values, TensorEntry):
            raise ValueError(f"the manifest has no rows/values for delta tensor {tensor.path}")
        found[tensor.path] = (rows, values)
    return found


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
