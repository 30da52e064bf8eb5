"""Crash-safe, resumable PyTorch checkpoints on torchsnapshot + fsspec.

API-compatible with twitter/the-algorithm-ml's ``tml.common.checkpointing``. Works on any
fsspec URL (local paths, ``memory://``, ``s3://`` through s3fs, ...). Never imports Prefect.

The public names are imported on first use (PEP 562), not with the package: the writer process
(``python -m tml_checkpointing.writing.writer_main``) runs this file first and must not pay
for torch and torchsnapshot, which it never uses; the CLI's quick commands start faster too.
``from tml_checkpointing import Snapshot`` works as before; type checkers and IDEs read the
imports under ``TYPE_CHECKING``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_names
from ._version import __version__

if TYPE_CHECKING:
    from .catalog.discovery import (
        CheckpointPath,
        checkpoints_iterator,
        get_checkpoint,
        get_checkpoints,
        is_committed,
        list_checkpoints,
        scan_checkpoints,
        step_from_checkpoint,
    )
    from .catalog.evaluation import (
        EvaluatorWaitResult,
        evaluated_partitions,
        is_done_eval,
        mark_done_eval,
        read_checkpoint_metrics,
        wait_for_evaluators,
        write_checkpoint_metrics,
    )
    from .errors import (
        BrokenChainError,
        CheckpointError,
        CheckpointExistsError,
        CheckpointMismatchError,
        CheckpointNotFoundError,
        CheckpointReadError,
        CheckpointShapeMismatchError,
        CheckpointWriteError,
        CorruptCheckpointError,
        InvalidArgumentError,
        InvalidCheckpointPathError,
        InvalidPartitionNameError,
        InvalidStepError,
        InvalidStorageUrlError,
        MaterializeDestinationError,
        NotACheckpointDirectoryError,
        NotASaveDirError,
        PreemptedError,
        RankSaveError,
        SaveDirLockedError,
        SnapshotEntryNotFoundError,
        SnapshotStateError,
        StepTypeError,
        StorageLocationNotFoundError,
        UnsupportedProtocolError,
    )
    from .events import (
        CORRUPT_FOUND,
        DELETE_DONE,
        DELETE_STARTED,
        DELETE_UNCOMMITTED,
        EVENT_NAMES,
        INCOMPLETE_REMOVED,
        QUARANTINED,
        SAVE_COMMITTED,
        SAVE_DATA_WRITTEN,
        SAVE_FAILED,
        SAVE_RANK_REPORTED,
        SAVE_RANKS_JOINED,
        SAVE_SIDECAR_WRITTEN,
        SAVE_STARTED,
        Event,
        emit,
        subscribe,
        unsubscribe,
    )
    from .lifecycle.cleanup import (
        IncompleteCheckpoint,
        clean_incomplete,
        find_incomplete,
        quarantine_checkpoint,
    )
    from .lifecycle.preemption import PreemptionGuard, save_final_checkpoint
    from .lifecycle.retention import (
        PruneResult,
        RetentionPlan,
        RetentionPolicy,
        plan_retention,
        prune,
    )
    from .reading.verify import VerifyReport, get_latest_valid_checkpoint, verify_checkpoint
    from .snapshot import PendingSave, Snapshot
    from .storage.filesystem import infer_fs, join_url
    from .storage.locking import WriterLock
    from .writing.materialize import materialize

__all__ = [
    "CORRUPT_FOUND",
    "DELETE_DONE",
    "DELETE_STARTED",
    "DELETE_UNCOMMITTED",
    "EVENT_NAMES",
    "INCOMPLETE_REMOVED",
    "QUARANTINED",
    "SAVE_COMMITTED",
    "SAVE_DATA_WRITTEN",
    "SAVE_FAILED",
    "SAVE_RANKS_JOINED",
    "SAVE_RANK_REPORTED",
    "SAVE_SIDECAR_WRITTEN",
    "SAVE_STARTED",
    "BrokenChainError",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CheckpointPath",
    "CheckpointReadError",
    "CheckpointShapeMismatchError",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "EvaluatorWaitResult",
    "Event",
    "IncompleteCheckpoint",
    "InvalidArgumentError",
    "InvalidCheckpointPathError",
    "InvalidPartitionNameError",
    "InvalidStepError",
    "InvalidStorageUrlError",
    "MaterializeDestinationError",
    "NotACheckpointDirectoryError",
    "NotASaveDirError",
    "PendingSave",
    "PreemptedError",
    "PreemptionGuard",
    "PruneResult",
    "RankSaveError",
    "RetentionPlan",
    "RetentionPolicy",
    "SaveDirLockedError",
    "Snapshot",
    "SnapshotEntryNotFoundError",
    "SnapshotStateError",
    "StepTypeError",
    "StorageLocationNotFoundError",
    "UnsupportedProtocolError",
    "VerifyReport",
    "WriterLock",
    "__version__",
    "checkpoints_iterator",
    "clean_incomplete",
    "emit",
    "evaluated_partitions",
    "find_incomplete",
    "get_checkpoint",
    "get_checkpoints",
    "get_latest_valid_checkpoint",
    "infer_fs",
    "is_committed",
    "is_done_eval",
    "join_url",
    "list_checkpoints",
    "mark_done_eval",
    "materialize",
    "plan_retention",
    "prune",
    "quarantine_checkpoint",
    "read_checkpoint_metrics",
    "save_final_checkpoint",
    "scan_checkpoints",
    "step_from_checkpoint",
    "subscribe",
    "unsubscribe",
    "verify_checkpoint",
    "wait_for_evaluators",
    "write_checkpoint_metrics",
]

# Where each public name lives (the same imports as above, made on first use).
_SOURCES: dict[str, tuple[str, ...]] = {
    "catalog.discovery": (
        "CheckpointPath",
        "checkpoints_iterator",
        "get_checkpoint",
        "get_checkpoints",
        "is_committed",
        "list_checkpoints",
        "scan_checkpoints",
        "step_from_checkpoint",
    ),
    "catalog.evaluation": (
        "EvaluatorWaitResult",
        "evaluated_partitions",
        "is_done_eval",
        "mark_done_eval",
        "read_checkpoint_metrics",
        "wait_for_evaluators",
        "write_checkpoint_metrics",
    ),
    "errors": (
        "BrokenChainError",
        "CheckpointError",
        "CheckpointExistsError",
        "CheckpointMismatchError",
        "CheckpointNotFoundError",
        "CheckpointReadError",
        "CheckpointShapeMismatchError",
        "CheckpointWriteError",
        "RankSaveError",
        "CorruptCheckpointError",
        "InvalidArgumentError",
        "InvalidCheckpointPathError",
        "InvalidPartitionNameError",
        "InvalidStepError",
        "InvalidStorageUrlError",
        "MaterializeDestinationError",
        "NotACheckpointDirectoryError",
        "NotASaveDirError",
        "PreemptedError",
        "SaveDirLockedError",
        "SnapshotEntryNotFoundError",
        "SnapshotStateError",
        "StepTypeError",
        "StorageLocationNotFoundError",
        "UnsupportedProtocolError",
    ),
    "events": (
        "CORRUPT_FOUND",
        "DELETE_DONE",
        "DELETE_STARTED",
        "DELETE_UNCOMMITTED",
        "EVENT_NAMES",
        "INCOMPLETE_REMOVED",
        "QUARANTINED",
        "SAVE_COMMITTED",
        "SAVE_DATA_WRITTEN",
        "SAVE_FAILED",
        "SAVE_RANK_REPORTED",
        "SAVE_RANKS_JOINED",
        "SAVE_SIDECAR_WRITTEN",
        "SAVE_STARTED",
        "Event",
        "emit",
        "subscribe",
        "unsubscribe",
    ),
    "lifecycle.cleanup": (
        "IncompleteCheckpoint",
        "clean_incomplete",
        "find_incomplete",
        "quarantine_checkpoint",
    ),
    "lifecycle.preemption": (
        "PreemptionGuard",
        "save_final_checkpoint",
    ),
    "lifecycle.retention": (
        "PruneResult",
        "RetentionPlan",
        "RetentionPolicy",
        "plan_retention",
        "prune",
    ),
    "reading.verify": (
        "VerifyReport",
        "get_latest_valid_checkpoint",
        "verify_checkpoint",
    ),
    "snapshot": (
        "PendingSave",
        "Snapshot",
    ),
    "storage.filesystem": (
        "infer_fs",
        "join_url",
    ),
    "storage.locking": ("WriterLock",),
    "writing.materialize": ("materialize",),
}
_MODULE_OF = {name: module for module, names in _SOURCES.items() for name in names}


__getattr__, __dir__ = lazy_names(__name__, globals(), _MODULE_OF, __all__)
