"""Restoring a Snapshot's state from a committed checkpoint: the one restore path.

Why the order: a checkpoint is checked before any byte lands in the caller's state (committed,
sizes from one listing, keys present, shapes fitting), so a bad checkpoint leaves the state as
it was. Then the fast path (:mod:`.fast_restore`: sequential reads in place, every byte hashed;
on each rank only the byte ranges of the shards it holds) when it applies, torchsnapshot's own
restore otherwise. A delta checkpoint's chain is followed, and its links checked, before
anything is read; it restores only in place.

With several ranks, all take the same path: torchsnapshot's restore is collective (it gathers
keys and waits at barriers), so one rank falling back while another reads in place would leave
the fallback waiting for peers that never come. The ranks agree on the path (one small
gather on the default group, in the restoring thread, as torchsnapshot's own restore does)
before anything is read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch.distributed as dist
from torchsnapshot import StateDict

from ..catalog.discovery import is_committed, step_from_checkpoint
from ..errors import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    SnapshotStateError,
    corrupt_checkpoint,
)
from ..format.chain_link import DELTA_ROOT
from ..format.layout import COMMIT_MARKER, EXTRA_STATE
from ..format.torchsnapshot_compat import KeyFilteredSnapshot
from ..storage.faults import reading
from ..storage.filesystem import StorageOptions, is_local, resolve
from ..storage.plugin import VERIFY_READS_OPTION, transport_url
from .chains import ChainedTensor, ancestry, chained_tensors, link_of, logical_metadata
from .fast_restore import RestoreStats, can_verify, plan_restore, run_restore
from .metadata import read_metadata, read_sidecars
from .shapes import check_restore_shapes
from .verify import VERIFY_LEVELS, VerifyLevel, verify_checkpoint

logger = logging.getLogger(__name__)


def restore_state(
    checkpoint: str,
    state: Mapping[str, Any],
    *,
    keys: Iterable[str] | None,
    verify: VerifyLevel,
    storage_options: StorageOptions,
) -> tuple[int, float] | None:
    """Load ``state`` (``{name: stateful}``, with ``extra_state``) from ``checkpoint``.

    Returns the saved ``(step, walltime)`` when ``extra_state`` is among ``keys`` (a
    checkpoint written before ``walltime`` existed gives ``0.0``; one without ``extra_state``
    its step from its name), else ``None``. Storage faults raise
    :class:`~tml_checkpointing.errors.CheckpointReadError`.
    """
    if verify not in VERIFY_LEVELS:
        raise SnapshotStateError(f"verify must be one of {VERIFY_LEVELS}, got {verify!r}")
    with reading(f"checkpoint {checkpoint}"):
        return _restore(checkpoint, state, keys, verify, storage_options)


def _restore(
    checkpoint: str,
    state: Mapping[str, Any],
    keys: Iterable[str] | None,
    verify: VerifyLevel,
    storage_options: StorageOptions,
) -> tuple[int, float] | None:
    if not is_committed(checkpoint, storage_options):
        raise CheckpointNotFoundError(
            f"{checkpoint} is not a committed checkpoint (no .snapshot_metadata); use "
            "get_checkpoint(save_dir) to find the latest one"
        )
    if verify != "none":
        # Sizes up front (one listing: catches missing and truncated files before any
        # state changes); with "full", every byte is then hashed as it is read.
        report = verify_checkpoint(checkpoint, level="size", storage_options=storage_options)
        if report.status == "unverified":
            logger.info("%s has no integrity sidecar; restoring it unverified.", checkpoint)
    wanted = list(state) if keys is None else list(dict.fromkeys(keys))
    unknown = [key for key in wanted if key not in state]
    if unknown:
        raise SnapshotStateError(
            f"cannot restore {unknown}: not in this Snapshot's state {sorted(state)}"
        )
    # The marker read here, not through torchsnapshot's Snapshot.metadata: that one first
    # builds a storage plugin, whose entry-point scan alone cost 0.05 s per restore.
    fs, root = resolve(checkpoint, storage_options)
    metadata, why = read_metadata(fs, root.rstrip("/"), checkpoint)
    if metadata is None:
        raise corrupt_checkpoint(checkpoint, COMMIT_MARKER, why, kind="marker")
    # A delta checkpoint: its chained tensors come from its ancestors (found, and their
    # links checked, before anything is read); the logical metadata lists them too.
    chained = None
    link = link_of(metadata, checkpoint)
    if link is not None and link.is_delta:
        with reading(f"the chain of checkpoint {checkpoint}"):
            chained = chained_tensors(ancestry(checkpoint, metadata, fs, root))
        metadata = logical_metadata(metadata, link)
    # Keys from the metadata's own manifest ("<rank>/<key>/..."): get_manifest() would
    # deep-copy every entry first (1.1 s for 5,000 tensors).
    manifest = metadata.manifest
    saved_keys = {path.split("/")[1] for path in manifest if path.count("/") >= 1}
    saved_keys.discard(DELTA_ROOT)
    missing = [key for key in wanted if key not in saved_keys and key != EXTRA_STATE]
    if missing:
        raise CheckpointMismatchError(
            f"checkpoint {checkpoint} has no {missing} (it holds {sorted(saved_keys)}); "
            "restore a subset with restore(checkpoint, keys=[...])"
        )
    started = time.monotonic()
    app_state = {key: state[key] for key in wanted if key != EXTRA_STATE}
    saved_extra = StateDict()
    if EXTRA_STATE in wanted and EXTRA_STATE in saved_keys:
        app_state[EXTRA_STATE] = saved_extra
    check_restore_shapes(metadata, app_state, checkpoint)  # before any byte lands
    stats = _restore_in_place(checkpoint, metadata, app_state, verify, chained, storage_options)
    if stats is None:
        if chained:
            raise SnapshotStateError(
                f"{checkpoint} is a delta checkpoint, which restores only in place into CPU "
                "tensors (plain, or the local shards of sharded ones); materialize it first "
                "(`tml checkpoints materialize`) to restore it another way"
            )
        snapshot = KeyFilteredSnapshot(
            transport_url(checkpoint),
            storage_options={**storage_options, VERIFY_READS_OPTION: verify == "full"},
        )
        snapshot.restore(app_state)
        logger.info(
            "Restored %s in %.3fs through torchsnapshot.",
            checkpoint,
            time.monotonic() - started,
            extra={"restore_stats": None},
        )
    else:
        logger.info(
            "Restored %s in %.3fs in place: %d bytes read for %d restored, from %d files.",
            checkpoint,
            time.monotonic() - started,
            stats.bytes_read,
            stats.bytes_wanted,
            stats.files,
            extra={"restore_stats": stats},
        )
    if EXTRA_STATE not in wanted:
        return None
    step = int(saved_extra.get("step", step_from_checkpoint(checkpoint)))
    return step, float(saved_extra.get("walltime", 0.0))


def _restore_in_place(
    checkpoint: str,
    metadata: Any,
    app_state: dict[str, Any],
    verify: VerifyLevel,
    chained: dict[str, ChainedTensor] | None,
    storage_options: StorageOptions,
) -> RestoreStats | None:
    """The fast path (:mod:`~tml_checkpointing.reading.fast_restore`) when it applies on every
    rank (a delta checkpoint takes it on any filesystem: it is the only path that follows
    chains); what it read, or ``None`` when torchsnapshot must restore.

    The log record of a restore carries these stats as ``restore_stats`` (``None``: through
    torchsnapshot), which is how a caller (a test) sees which path a rank took.
    """
    fs, directory = resolve(checkpoint, storage_options)
    if not is_local(fs) and not chained:
        return None  # the same on every rank: the same checkpoint URL
    plan = plan_restore(metadata, app_state, directory.rstrip("/"), chained)
    sidecars = {}
    if plan is not None and verify == "full":
        sidecars = read_sidecars(fs, plan.directories, checkpoint)
    able = plan is not None and can_verify(plan, sidecars)
    if not _every_rank(able) or plan is None:
        return None
    return run_restore(plan, app_state, fs, sidecars, checkpoint)


def _every_rank(able: bool) -> bool:
    """Whether every rank can restore in place (``able`` on one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return able
    votes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(votes, able)
    return all(votes)
