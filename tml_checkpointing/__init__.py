"""Crash-safe, resumable PyTorch checkpoints on torchsnapshot + fsspec.

API-compatible with twitter/the-algorithm-ml's ``tml.common.checkpointing``. Works on any
fsspec URL (local paths, ``memory://``, ``s3://`` through s3fs, ...). Never imports Prefect.
"""

from .cleanup import (
    IncompleteCheckpoint,
    clean_incomplete,
    find_incomplete,
    quarantine_checkpoint,
)
from .discovery import (
    CheckpointPath,
    checkpoints_iterator,
    get_checkpoint,
    get_checkpoints,
    is_committed,
    list_checkpoints,
    scan_checkpoints,
    step_from_checkpoint,
)
from .errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
    InvalidArgumentError,
    InvalidCheckpointPathError,
    InvalidPartitionNameError,
    InvalidStepError,
    NotACheckpointDirectoryError,
    NotASaveDirError,
    PreemptedError,
    SaveDirLockedError,
    SnapshotEntryNotFoundError,
    SnapshotStateError,
    StepTypeError,
    UnsupportedProtocolError,
)
from .evaluation import (
    EvaluatorWaitResult,
    evaluated_partitions,
    is_done_eval,
    mark_done_eval,
    read_checkpoint_metrics,
    wait_for_evaluators,
    write_checkpoint_metrics,
)
from .filesystem import infer_fs, join_url
from .integrity import VerifyReport, get_latest_valid_checkpoint, verify_checkpoint
from .locking import WriterLock
from .preemption import PreemptionGuard, save_final_checkpoint
from .retention import PruneResult, RetentionPlan, RetentionPolicy, plan_retention, prune
from .snapshot import PendingSave, Snapshot

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CheckpointPath",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "EvaluatorWaitResult",
    "IncompleteCheckpoint",
    "InvalidArgumentError",
    "InvalidCheckpointPathError",
    "InvalidPartitionNameError",
    "InvalidStepError",
    "NotACheckpointDirectoryError",
    "NotASaveDirError",
    "PendingSave",
    "PreemptedError",
    "PreemptionGuard",
    "PruneResult",
    "RetentionPlan",
    "RetentionPolicy",
    "SaveDirLockedError",
    "Snapshot",
    "SnapshotEntryNotFoundError",
    "SnapshotStateError",
    "StepTypeError",
    "UnsupportedProtocolError",
    "VerifyReport",
    "WriterLock",
    "__version__",
    "checkpoints_iterator",
    "clean_incomplete",
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
    "plan_retention",
    "prune",
    "quarantine_checkpoint",
    "read_checkpoint_metrics",
    "save_final_checkpoint",
    "scan_checkpoints",
    "step_from_checkpoint",
    "verify_checkpoint",
    "wait_for_evaluators",
    "write_checkpoint_metrics",
]
