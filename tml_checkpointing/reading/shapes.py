"""Does a checkpoint fit the state it is restored into? Checked before any byte is loaded.

Why: torchsnapshot restores tensors in place, one after the other, and only then calls
``load_state_dict``. A checkpoint of another model (another recipe, another width) therefore
fails half-way, with a raw ``RuntimeError``, after some tensors were already overwritten. This
module compares the checkpoint's manifest (shapes recorded at save time) with the tensors of
the state about to be restored and raises :class:`CheckpointShapeMismatchError` naming the
first tensor that does not fit, while the state is still untouched. Retrying cannot fix it.

Only plain tensors are compared. Sharded tensors (``ShardedTensor``, ``DTensor``) may be
restored into another sharding plan on purpose (torchsnapshot reshards them), so their local
shapes are not expected to match.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
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
    mismatches: list[ShapeMismatch] = []
    for key, stateful in state.items():
        _, flattened = flatten(stateful.state_dict(), prefix=key)
        expected = {path: value for path, value in flattened.items() if _is_plain_tensor(value)}
        strict = isinstance(stateful, torch.nn.Module)
        for path, tensor in expected.items():
            saved = _saved_shape(manifest.get(path))
            if saved is None:
                if strict and path not in manifest:
                    mismatches.append(ShapeMismatch(path, None, list(tensor.shape)))
                continue
            if saved != list(tensor.shape):
                mismatches.append(ShapeMismatch(path, saved, list(tensor.shape)))
        if strict:
            mismatches.extend(
                ShapeMismatch(path, saved, None)
                for path, saved in _saved_tensors_under(manifest, key)
                if path not in flattened
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

    For a caller that must know a resume can work before it writes anything (the train flow
    checks this before it records the run or takes the writer lock).
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


def _is_plain_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and type(value).__name__ not in _SHARDED_TYPES


_SHARDED_TYPES = {"ShardedTensor", "DTensor"}
_SHAPED_ENTRY_TYPES = {"Tensor", "ChunkedTensor"}


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
