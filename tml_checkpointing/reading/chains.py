"""Following a delta checkpoint's chain: its ancestors, and where each chained tensor comes from.

A delta checkpoint (:mod:`~tml_checkpointing.format.chain_link`) names its parent by step
and by the parent's link id. Reading it means walking parents until every chained tensor has met the
checkpoint that stored it whole. A link that does not hold (parent not committed, another id,
no link at all) makes the checkpoint corrupt: its bytes can no longer be rebuilt, whatever its
own files say. A parent that cannot be *read* is a storage fault, as everywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fsspec import AbstractFileSystem
from torchsnapshot.manifest import Entry, ShardedTensorEntry, SnapshotMetadata, TensorEntry

from ..errors import (
    BrokenChainError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    corrupt_checkpoint,
    corrupt_message,
)
from ..format.chain_link import ChainLink, DeltaPiece, chain_link, delta_pieces
from ..format.layout import COMMIT_MARKER
from ..format.torchsnapshot_compat import manifest_of_rank
from ..storage.filesystem import StorageOptions, resolve
from .metadata import read_metadata


@dataclass
class Ancestor:
    """One checkpoint of a chain, its parsed marker and its link."""

    checkpoint: str  # URL
    root: str  # path within the filesystem
    metadata: SnapshotMetadata
    link: ChainLink | None


@dataclass
class ChainedTensor:
    """Where a chained tensor's value comes from: a whole copy, then deltas oldest first.

    The whole copy is a plain ``TensorEntry`` or, for a sharded tensor, the
    ``ShardedTensorEntry`` of every saving rank's shards; a delta checkpoint may hold several
    pieces of one sharded tensor (one per saved shard), each applied where its rows fall.
    """

    path: str
    base: tuple[Ancestor, TensorEntry | ShardedTensorEntry]
    deltas: list[tuple[Ancestor, DeltaPiece]] = field(default_factory=list)

    @property
    def sharded(self) -> bool:
        return isinstance(self.base[1], ShardedTensorEntry)


def sibling(checkpoint: str, name: str) -> str:
    """The checkpoint ``name`` in the same save_dir as ``checkpoint`` (URLs keep the scheme)."""
    return f"{checkpoint.rstrip('/').rsplit('/', 1)[0]}/{name}"


def link_of(metadata: SnapshotMetadata, checkpoint: str) -> ChainLink | None:
    """The checkpoint's chain link; an unparsable one makes it corrupt."""
    try:
        return chain_link(manifest_of_rank(metadata, 0))
    except (ValueError, KeyError, TypeError) as error:
        raise corrupt_checkpoint(
            checkpoint, COMMIT_MARKER, f"its chain link does not parse ({error})", kind="chain"
        ) from error


def ancestry(
    checkpoint: str,
    metadata: SnapshotMetadata,
    fs: AbstractFileSystem,
    root: str,
) -> list[Ancestor]:
    """``[the checkpoint, its parent, ...]`` up to the chain's full checkpoint."""
    chain = [Ancestor(checkpoint, root.rstrip("/"), metadata, link_of(metadata, checkpoint))]
    while chain[-1].link is not None and chain[-1].link.is_delta:
        child = chain[-1]
        link = child.link
        assert link is not None and link.parent is not None
        parent = sibling(child.checkpoint, link.parent)
        parent_root = sibling(child.root, link.parent)
        try:
            parsed, why = read_metadata(fs, parent_root, parent)
        except CheckpointNotFoundError:
            parsed, why = None, "it is not committed (deleted or never finished)"
        except FileNotFoundError:
            parsed, why = None, "it is not committed (deleted or never finished)"
        if parsed is None:
            raise broken_link(checkpoint, child.checkpoint, f"parent {parent}: {why}")
        parent_link = link_of(parsed, parent)
        if parent_link is None or parent_link.id != link.parent_id:
            found = parent_link.id if parent_link else "no chain link"
            raise broken_link(
                checkpoint,
                child.checkpoint,
                f"parent {parent} is another checkpoint than the one this delta was computed "
                f"against (link id {found}, expected {link.parent_id}); it was saved again",
            )
        if parent_link.depth != link.depth - 1:  # depths fall by one: no loops, no detours
            raise broken_link(
                checkpoint,
                child.checkpoint,
                f"parent {parent} has chain depth {parent_link.depth}, expected {link.depth - 1}",
            )
        chain.append(Ancestor(parent, parent_root, parsed, parent_link))
    return chain


def read_chain_link(
    checkpoint: str, storage_options: StorageOptions | None = None
) -> ChainLink | None:
    """The chain link of a committed checkpoint (one marker read); ``None`` when it has none,
    is no longer committed, or its marker or link does not parse (verification says why)."""
    fs, root = resolve(checkpoint, storage_options)
    try:
        metadata, _ = read_metadata(fs, root.rstrip("/"), checkpoint)
        return link_of(metadata, checkpoint) if metadata is not None else None
    except (CheckpointNotFoundError, CorruptCheckpointError):
        return None


def broken_link(checkpoint: str, at: str, problem: str) -> BrokenChainError:
    return BrokenChainError(
        corrupt_message(
            checkpoint, COMMIT_MARKER, f"its chain is broken at {at}: {problem}", "chain"
        ),
        checkpoint=checkpoint,
        path=COMMIT_MARKER,
        at=at,
        problem=problem,
    )


def chained_tensors(chain: list[Ancestor]) -> dict[str, ChainedTensor]:
    """For each tensor the newest checkpoint stores as rows: its base copy and its deltas."""
    newest = chain[0]
    if newest.link is None or not newest.link.is_delta:
        return {}
    resolved: dict[str, ChainedTensor] = {}
    for path in dict.fromkeys(tensor.path for tensor in newest.link.tensors):
        deltas: list[tuple[Ancestor, DeltaPiece]] = []
        base: tuple[Ancestor, TensorEntry | ShardedTensorEntry] | None = None
        for ancestor in chain:
            link = ancestor.link
            if link is not None and link.is_delta and path in {t.path for t in link.tensors}:
                pieces = delta_pieces(ancestor.metadata.manifest, link)
                # Newest first here, reversed below: pieces of one checkpoint never overlap.
                deltas.extend((ancestor, piece) for piece in pieces if piece.tensor.path == path)
                continue
            entry = manifest_of_rank(ancestor.metadata, 0).get(path)
            if not isinstance(entry, TensorEntry | ShardedTensorEntry):
                problem = f"it does not hold {path}"
                raise broken_link(newest.checkpoint, ancestor.checkpoint, problem)
            base = (ancestor, entry)
            break
        if base is None:
            raise broken_link(newest.checkpoint, chain[-1].checkpoint, f"no full {path}")
        resolved[path] = ChainedTensor(path, base, deltas[::-1])
    return resolved


def logical_metadata(metadata: SnapshotMetadata, link: ChainLink | None) -> SnapshotMetadata:
    """The metadata with a (placeholder) entry for each chained tensor, so that shape checks
    and restore plans see the whole state; locations name the chain, not a file."""
    if link is None or not link.is_delta:
        return metadata
    manifest: dict[str, Any] = dict(metadata.manifest)
    for tensor in link.tensors:  # under every rank: each rank's restore looks for its own
        for rank in range(metadata.world_size):
            manifest[f"{rank}/{tensor.path}"] = placeholder(tensor.dtype, tensor.global_shape)
    return SnapshotMetadata(
        version=metadata.version, world_size=metadata.world_size, manifest=manifest
    )


def placeholder(dtype: str, shape: tuple[int, ...]) -> Entry:
    """A manifest entry naming a chained tensor's dtype and global shape (no file)."""
    return TensorEntry(
        location="(chain)",
        serializer="buffer_protocol",
        dtype=dtype,
        shape=list(shape),
        replicated=False,
    )
