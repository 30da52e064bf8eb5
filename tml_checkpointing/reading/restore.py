"""Restoring a Snapshot's state from a committed checkpoint: the one restore path.

Why the order: a checkpoint is checked before any byte lands in the caller's state (committed,
sizes from one listing, keys present, shapes fitting), so a bad checkpoint leaves the state as
it was. Then the fast path (:mod:`.fast_restore`: sequential reads in place, every byte hashed)
when it applies, torchsnapshot's own restore otherwise. A delta checkpoint's chain is followed,
and its links checked, before anything is read; it restores only in place.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from torchsnapshot import StateDict

from ..catalog.discovery import is_committed, step_from_checkpoint
from ..errors import CheckpointMismatchError, CheckpointNotFoundError, SnapshotStateError
from ..format.chain_link import DELTA_ROOT
from ..format.layout import EXTRA_STATE
from ..format.torchsnapshot_compat import KeyFilteredSnapshot
from ..storage.faults import reading
from ..storage.filesystem import StorageOptions, is_local, resolve
from ..storage.plugin import VERIFY_READS_OPTION, transport_url
from .chains import ChainedTensor, ancestry, chained_tensors, link_of, logical_metadata
from .fast_restore import can_verify, plan_restore, run_restore
from .metadata import read_sidecars
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
    snapshot = KeyFilteredSnapshot(
        transport_url(checkpoint),
        storage_options={**storage_options, VERIFY_READS_OPTION: verify == "full"},
    )
    # A delta checkpoint: its chained tensors come from its ancestors (found, and their
    # links checked, before anything is read); the logical metadata lists them too.
    metadata, chained = snapshot.metadata, None
    link = link_of(metadata, checkpoint)
    if link is not None and link.is_delta:
        fs, root = resolve(checkpoint, storage_options)
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
    if not _restore_in_place(checkpoint, metadata, app_state, verify, chained, storage_options):
        if chained:
            raise SnapshotStateError(
                f"{checkpoint} is a delta checkpoint, which restores only into plain CPU "
                "tensors of one process; materialize it first (`tml checkpoints "
                "materialize`) to restore it another way"
            )
        snapshot.restore(app_state)
    logger.info("Restored %s in %.3fs.", checkpoint, time.monotonic() - started)
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
) -> bool:
    """The fast path (:mod:`~tml_checkpointing.reading.fast_restore`) when it applies (a delta
    checkpoint takes it on any filesystem: it is the only path that follows chains)."""
    fs, directory = resolve(checkpoint, storage_options)
    if not is_local(fs) and not chained:
        return False
    plan = plan_restore(metadata, app_state, directory.rstrip("/"), chained)
    if plan is None:
        return False
    sidecars = read_sidecars(fs, plan.directories, checkpoint) if verify == "full" else {}
    if not can_verify(plan, sidecars):
        return False
    run_restore(plan, app_state, fs, sidecars, checkpoint)
    return True
