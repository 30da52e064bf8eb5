"""Does a checkpoint fit the state it is restored into? Checked before any byte is loaded.

Why: torchsnapshot restores tensors in place, one after the other, and only then calls
``load_state_dict``. A checkpoint of another model (another recipe, another width) therefore
fails half-way, with a raw ``RuntimeError``, after some tensors were already overwritten. This
module compares the checkpoint's manifest (shapes recorded at save time) with the tensors of
the state about to be restored and raises :class:`CheckpointShapeMismatchError` naming the
first tensor that does not fit, while the state is still untouched. Retrying cannot fix it.

Sharded tensors (``ShardedTensor``, ``DTensor``) are compared by their *global* size: they
may be restored into another sharding plan or world size on purpose (torchsnapshot reshards
them), so a rank's local shard is not expected to match what any rank saved, but the whole
tensor must. The saved global size is the extent of the shards of every saving rank; the
expected one is the size of the rank's sharded tensor, which each rank knows without the
others. So each rank can check the checkpoint against its own part of a sharded model (a
model no single machine could build whole), from the manifest alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor.api import ShardedTensor
from torchsnapshot.flatten import flatten

from ..errors import CheckpointShapeMismatchError
from ..format.torchsnapshot_compat import KeyFilteredSnapshot, manifest_of_rank
from ..storage.faults import reading
from ..storage.filesystem import StorageOptions
from ..storage.plugin import transport_url
from .chains import link_of, logical_metadata


@dataclass(frozen=True)
class ShapeMismatch:
    """One tensor that does not fit: ``saved``/``expected`` is ``None`` where it is absent."""

    name: str
    saved: list[int] | None
    expected: list[int] | None

    def describe(self) -> str:
        if self.saved is None:
            return f"{self.name} (not in the checkpoint, expected shape {self.expected})"
        if self.expected is None:
            return f"{self.name} (saved shape {self.saved}, not in the state being restored)"
        return f"{self.name} (saved shape {self.saved}, expected shape {self.expected})"


def find_shape_mismatches(metadata: Any, state: Mapping[str, Any]) -> list[ShapeMismatch]:
    """Every tensor of ``state`` (``{key: stateful}``) that the snapshot cannot load into.

    ``metadata`` is the torchsnapshot ``SnapshotMetadata`` of the checkpoint. A module's
    tensors must also all be present, and the checkpoint may hold no extra tensor under the
    module's key (``load_state_dict`` is strict); other statefuls (optimizers) legitimately
    gain or lose state entries, so for them only common tensors are compared.
    """
    rank = _rank()  # a rank added since the save reads rank 0's part (see torchsnapshot_compat)
    rank = rank if rank < metadata.world_size else 0
    manifest = manifest_of_rank(metadata, rank)  # read only
    # A sharded tensor may be in no entry of this rank's manifest (a whole table saved by
    # another rank), and a rank's entry may hold its own shards only: sizes over all ranks.
    sharded = _saved_global_sizes(metadata)
    mismatches: list[ShapeMismatch] = []
    for key, stateful in state.items():
        _, flattened = flatten(stateful.state_dict(), prefix=key)
        expected = {path: value for path, value in flattened.items() if _is_tensor(value)}
        strict = isinstance(stateful, torch.nn.Module)
        for path, tensor in expected.items():
            saved = sharded[path] if path in sharded else _saved_shape(manifest.get(path))
            if saved is None:
                if strict and path not in manifest:
                    mismatches.append(ShapeMismatch(path, None, _global_shape(tensor)))
                continue
            if saved != _global_shape(tensor):
                mismatches.append(ShapeMismatch(path, saved, _global_shape(tensor)))
        if strict:
            saved_under = {**dict(_saved_tensors_under(manifest, key)), **sharded}
            mismatches.extend(
                ShapeMismatch(path, saved, None)
                for path, saved in saved_under.items()
                if path.startswith(f"{key}/") and path not in flattened
            )
    return mismatches


def check_restore_shapes(metadata: Any, state: Mapping[str, Any], checkpoint: str) -> None:
    """Raise :class:`CheckpointShapeMismatchError` when ``state`` cannot take the checkpoint."""
    mismatches = find_shape_mismatches(metadata, state)
    if not mismatches:
        return
    more = f" (and {len(mismatches) - 1} more)" if len(mismatches) > 1 else ""
    raise CheckpointShapeMismatchError(
        f"checkpoint {checkpoint} does not fit the state being restored: "
        f"{mismatches[0].describe()}{more}. It was written by another model (another recipe or "
        "model size); restore it into that model, or start a new run in another save_dir. "
        "Nothing was restored."
    )


def check_checkpoint_fits(
    checkpoint: str, state: Mapping[str, Any], storage_options: StorageOptions | None = None
) -> None:
    """:func:`check_restore_shapes` without restoring: reads only the checkpoint's manifest.

    For a caller that must know a resume can work before it writes or restores anything: the
    train flow of a one-process run checks before it records the run or takes the writer
    lock; each rank of a run with several checks its part of the model before restoring.
    """
    with reading(f"the manifest of {checkpoint}"):
        metadata = KeyFilteredSnapshot(
            transport_url(checkpoint), storage_options=dict(storage_options or {})
        ).metadata
    # A delta checkpoint lists its chained tensors in its link, not as entries of their own.
    metadata = logical_metadata(metadata, link_of(metadata, checkpoint))
    check_restore_shapes(metadata, state, checkpoint)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _is_tensor(value: Any) -> bool:
    """A plain tensor, or a sharded one (``ShardedTensor`` and ``DTensor`` subclass Tensor)."""
    return isinstance(value, torch.Tensor)


def _global_shape(tensor: torch.Tensor) -> list[int]:
    """The whole tensor's shape: for a sharded tensor its global size, not the local shard's
    (a ``DTensor``'s shape is global by definition). A ``ShardedTensor``'s is read from its
    metadata: its ``size()`` warns of ShardedTensor's deprecation into every rank's log."""
    if isinstance(tensor, ShardedTensor):
        return [int(size) for size in tensor.metadata().size]
    return [int(size) for size in tensor.size()]


_SHAPED_ENTRY_TYPES = {"Tensor", "ChunkedTensor"}
_SHARDED_ENTRY_TYPE = "ShardedTensor"


def _saved_global_sizes(metadata: Any) -> dict[str, list[int]]:
    """The global size of every sharded tensor the checkpoint holds, by logical path.

    Read from the manifest of every saving rank (``"<rank>/<path>"``): per dimension, the
    farthest extent (offset + size) of any of its shards. Shards of a sharded tensor tile it,
    so that extent is the size the tensor had when it was saved.
    """
    sizes: dict[str, list[int]] = {}
    for global_path, entry in metadata.manifest.items():
        if getattr(entry, "type", "") != _SHARDED_ENTRY_TYPE:
            continue
        path = global_path.split("/", 1)[1]
        extent = sizes.get(path)
        for shard in entry.shards:
            ends = [
                int(offset) + int(size)
                for offset, size in zip(shard.offsets, shard.sizes, strict=True)
            ]
            extent = (
                ends if extent is None else [max(a, b) for a, b in zip(extent, ends, strict=True)]
            )
        if extent is not None:
            sizes[path] = extent
    return sizes


def _saved_shape(entry: Any) -> list[int] | None:
    if entry is None or getattr(entry, "type", "") not in _SHAPED_ENTRY_TYPES:
        return None
    return [int(size) for size in entry.shape]


def _saved_tensors_under(manifest: Mapping[str, Any], key: str) -> Iterator[tuple[str, list[int]]]:
    for path, entry in manifest.items():
        if path.startswith(f"{key}/"):
            saved = _saved_shape(entry)
            if saved is not None:
                yield path, saved
