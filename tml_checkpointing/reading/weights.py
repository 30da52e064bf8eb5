"""One tensor of a checkpoint read into a tensor in place, with no training state around it.

Why: warm-starting from a pretrained embedding table (``Snapshot.load_snapshot_to_weight``, as
``tml.common.checkpointing`` offers) needs one entry, found by its logical name, whatever
ranks and sharding plan wrote it, and from a delta checkpoint's chain when it is chained.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import torch
import torchsnapshot

from ..errors import SnapshotEntryNotFoundError, SnapshotStateError, corrupt_checkpoint
from ..format.chain_link import DELTA_ROOT
from ..format.layout import COMMIT_MARKER
from ..storage.faults import reading
from ..storage.filesystem import StorageOptions, resolve
from ..storage.plugin import TRANSPORT_SCHEME, VERIFY_READS_OPTION
from .chains import ancestry, chained_tensors, link_of
from .fast_restore import read_chained_tensor
from .metadata import read_metadata, read_sidecars

logger = logging.getLogger(__name__)

_TENSOR_ENTRY_TYPES = {"Tensor", "ShardedTensor", "ChunkedTensor", "DTensor"}


def load_tensor(
    torch_snapshot: torchsnapshot.Snapshot, name: str, weight_tensor: torch.Tensor
) -> None:
    """Load the tensor ``name`` of ``torch_snapshot`` into ``weight_tensor``, in place.

    ``name`` is the entry's logical path without the rank (``model/embeddings.weight``) or a
    unique part of it. A table sharded over ranks is read whole from every rank's shards; no
    process group is needed.
    """
    tensors = _tensor_entries(torch_snapshot.get_manifest())
    checkpoint = torch_snapshot.path.removeprefix(f"{TRANSPORT_SCHEME}://")
    link = link_of(torch_snapshot.metadata, checkpoint)
    chained = {t.path for t in link.tensors} if link is not None and link.is_delta else set()
    tensors.update({path: (f"0/{path}", []) for path in chained})
    tensors = {path: found for path, found in tensors.items() if not _is_delta_part(path)}
    exact = name.strip("/")
    if exact in tensors:
        chosen = exact
    else:
        matches = [path for path in tensors if name in path]
        if len(matches) != 1:
            listing = ", ".join(sorted(matches or tensors)[:30])
            problem = "is ambiguous" if matches else "matches no tensor"
            raise SnapshotEntryNotFoundError(
                f"{name!r} {problem} in snapshot {torch_snapshot.path}; "
                f"{'candidates' if matches else 'tensors it holds'}: {listing or '(none)'}"
            )
        chosen = matches[0]
    ranked, saved_shape = tensors[chosen]
    if saved_shape and list(weight_tensor.shape) != saved_shape:
        raise SnapshotStateError(
            f"{chosen} has shape {saved_shape} in the snapshot, but the target tensor "
            f"has shape {list(weight_tensor.shape)}"
        )
    started = time.monotonic()
    with reading(f"{chosen} of snapshot {checkpoint}"):
        if chosen in chained:
            options = dict(getattr(torch_snapshot, "_storage_options", None) or {})
            options.pop(VERIFY_READS_OPTION, None)
            _read_chained(checkpoint, chosen, weight_tensor, options)
        else:
            torch_snapshot.read_object(ranked, obj_out=weight_tensor)
    logger.info("Loaded %s in %.3fs.", chosen, time.monotonic() - started)


def _read_chained(
    checkpoint: str, path: str, out: torch.Tensor, storage_options: StorageOptions
) -> None:
    """One tensor of a delta checkpoint, rebuilt from its chain, every byte verified."""
    fs, root = resolve(checkpoint, storage_options)
    metadata, why = read_metadata(fs, root.rstrip("/"), checkpoint)
    if metadata is None:
        raise corrupt_checkpoint(checkpoint, COMMIT_MARKER, why, kind="marker")
    chained = chained_tensors(ancestry(checkpoint, metadata, fs, root))[path]
    roots = {chained.base[0].root, *(delta[0].root for delta in chained.deltas)}
    read_chained_tensor(fs, chained, out, read_sidecars(fs, roots, checkpoint), checkpoint)


def _is_delta_part(path: str) -> bool:
    return path == DELTA_ROOT or path.startswith(f"{DELTA_ROOT}/")


def _tensor_entries(manifest: Mapping[str, Any]) -> dict[str, tuple[str, list[int]]]:
    """``{logical path: (ranked path to read, full shape)}`` of every tensor in a manifest.

    The lowest rank that saved a path is read (rank 0 for replicated and plain state). A
    sharded entry lists only its rank's shards; ``read_object`` merges all ranks' shards, and
    the full shape is the extent of all of them.
    """
    found: dict[str, tuple[str, list[int]]] = {}
    extents: dict[str, list[int]] = {}
    for path, entry in sorted(manifest.items(), key=lambda item: _rank_of(item[0])):
        if "/" not in path or getattr(entry, "type", "") not in _TENSOR_ENTRY_TYPES:
            continue
        logical = path.split("/", 1)[1]
        found.setdefault(logical, (path, list(getattr(entry, "shape", None) or [])))
        for shard in getattr(entry, "shards", None) or []:
            ends = [int(o) + int(n) for o, n in zip(shard.offsets, shard.sizes, strict=True)]
            known = extents.setdefault(logical, ends)
            extents[logical] = [max(a, b) for a, b in zip(known, ends, strict=True)]
    for logical, shape in extents.items():
        found[logical] = (found[logical][0], shape)
    return found


def _rank_of(ranked_path: str) -> int:
    head = ranked_path.split("/", 1)[0]
    return int(head) if head.isdigit() else 0
