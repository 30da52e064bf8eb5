"""Crash-safe, resumable PyTorch checkpoints on torchsnapshot + fsspec.

API-compatible with twitter/the-algorithm-ml's ``tml.common.checkpointing``. Works on any
fsspec URL (local paths, ``memory://``, ``s3://`` through s3fs, ...). Never imports Prefect.
"""

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
    InvalidCheckpointPathError,
    InvalidPartitionNameError,
    InvalidStepError,
    NotACheckpointDirectoryError,
    NotASaveDirError,
    PreemptedError,
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
    wait_for_evaluators,
)
from .filesystem import infer_fs, join_url
from .integrity import VerifyReport, get_latest_valid_checkpoint, verify_checkpoint
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
    "InvalidCheckpointPathError",
    "InvalidPartitionNameError",
    "InvalidStepError",
    "NotACheckpointDirectoryError",
    "NotASaveDirError",
    "PendingSave",
    "PreemptedError",
    "Snapshot",
    "SnapshotEntryNotFoundError",
    "SnapshotStateError",
    "StepTypeError",
    "UnsupportedProtocolError",
    "VerifyReport",
    "__version__",
    "checkpoints_iterator",
    "evaluated_partitions",
    "get_checkpoint",
    "get_checkpoints",
    "get_latest_valid_checkpoint",
    "infer_fs",
    "is_committed",
    "is_done_eval",
    "join_url",
    "list_checkpoints",
    "mark_done_eval",
    "scan_checkpoints",
    "step_from_checkpoint",
    "verify_checkpoint",
    "wait_for_evaluators",
]
