"""The incremental link format: how a delta checkpoint names its chain in its manifest.

In the torchsnapshot manifest (``<rank>/tml_delta/...``, a key no state uses)::

    0/tml_delta/chain      str: the ChainLink as JSON (id, parent step, parent id, depth, ...)
    <r>/tml_delta/<i>/rows   int64 [n]: indices of the changed rows of rank r's delta tensor i
    <r>/tml_delta/<i>/values [n, ...]: their values

Rank 0's link lists the delta tensors of every rank (:class:`DeltaTensor` ``rank``/``index``
say whose entries hold its rows). A delta tensor is a whole plain tensor or one saved shard of
a sharded tensor (TorchRec tables): ``offsets`` place the shard in the global tensor, and its
rows are the shard's own (row ``k`` of the shard is global row ``offsets[0] + k``), so a chain
restores into any number of ranks under any plan: each reader applies the rows that fall in
what it owns.

A tensor's value at checkpoint ``k`` is its full value at the nearest ancestor that stored it
whole, with every delta from there to ``k`` applied in order. Every save of an incremental
Snapshot records a link (a full one has no parent), so a delta can prove that its parent is
the checkpoint it was computed against: a parent deleted and saved again under the same step
has another id, and the delta is then reported corrupt rather than restored wrong.

Plain ``torchsnapshot.Snapshot(path).restore`` cannot rebuild a delta checkpoint (the chained
tensors come back as ``None``, and ``load_state_dict`` refuses them);
:func:`~tml_checkpointing.writing.materialize.materialize` rewrites any checkpoint as a full,
plain one.

Why deltas at all, and which tensors are chained: :mod:`tml_checkpointing.writing.incremental`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from torchsnapshot.manifest import Entry, PrimitiveEntry, TensorEntry

DELTA_ROOT = "tml_delta"
CHAIN_ENTRY = f"{DELTA_ROOT}/chain"


def delta_rows_path(index: int) -> str:
    return f"{DELTA_ROOT}/{index}/rows"


def delta_values_path(index: int) -> str:
    return f"{DELTA_ROOT}/{index}/values"


@dataclass(frozen=True)
class DeltaTensor:
    """One tensor (or one shard of a sharded tensor) a checkpoint stores as changed rows."""

    path: str  # logical path without the rank, e.g. model/user.weight
    dtype: str
    shape: tuple[int, ...]  # of what was saved: the whole tensor, or the shard
    rows: int  # how many rows changed (and were written)
    offsets: tuple[int, ...] = ()  # a shard's place in the global tensor; (): a whole tensor
    size: tuple[int, ...] = ()  # the global tensor's shape, for a shard
    rank: int = 0  # whose manifest holds the rows and values
    index: int = -1  # they are <rank>/tml_delta/<index>/...; -1: its place in the list

    @property
    def sharded(self) -> bool:
        return bool(self.offsets)

    @property
    def global_shape(self) -> tuple[int, ...]:
        return self.size or self.shape

    @property
    def row_offset(self) -> int:
        """Global index of the saved piece's row 0."""
        return self.offsets[0] if self.offsets else 0

    @property
    def column_offset(self) -> int:
        """Global index of the saved piece's first column (2-D and wider)."""
        return self.offsets[1] if len(self.offsets) > 1 else 0


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
            DeltaTensor(
                t["path"],
                t["dtype"],
                tuple(t["shape"]),
                int(t["rows"]),
                offsets=tuple(t.get("offsets", ())),
                size=tuple(t.get("size", ())),
                rank=int(t.get("rank", 0)),
                index=int(t.get("index", position)),
            )
            for position, t in enumerate(raw.get("tensors", []))
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


@dataclass(frozen=True)
class DeltaPiece:
    """One delta tensor of a checkpoint with the entries that hold its rows and values."""

    tensor: DeltaTensor
    rows: TensorEntry
    values: TensorEntry


def delta_pieces(global_manifest: Mapping[str, Entry], link: ChainLink) -> list[DeltaPiece]:
    """Every delta tensor of a checkpoint, found in the marker's manifest (all ranks'
    ``<rank>/...`` paths, as ``SnapshotMetadata.manifest`` has them)."""
    found = []
    for tensor in link.tensors:
        prefix = f"{tensor.rank}/"
        rows = global_manifest.get(prefix + delta_rows_path(tensor.index))
        values = global_manifest.get(prefix + delta_values_path(tensor.index))
        if not isinstance(rows, TensorEntry) or not isinstance(values, TensorEntry):
            raise ValueError(f"the manifest has no rows/values for delta tensor {tensor.path}")
        found.append(DeltaPiece(tensor, rows, values))
    return found
