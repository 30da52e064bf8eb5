"""Every error the library raises on purpose.

All of them derive from :class:`CheckpointError`, so ``except CheckpointError`` catches
anything this library decided to refuse. Where a built-in exception says the same thing
(``FileNotFoundError`` for a missing checkpoint, ``ValueError`` for a malformed path), the
error derives from it too, so code written against the original ``tml`` helpers keeps working.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, Literal


class CheckpointError(Exception):
    """Base class of every error raised by ``tml_checkpointing``."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No committed checkpoint where one was asked for."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A save would overwrite a checkpoint that is already committed."""


class InvalidCheckpointPathError(CheckpointError, ValueError):
    """A path that cannot name a checkpoint (its last component is not a step number)."""


class NotACheckpointDirectoryError(CheckpointError, NotADirectoryError):
    """``save_dir`` exists but is a file, so it cannot hold checkpoints."""


class UnsupportedProtocolError(CheckpointError, ValueError):
    """The URL's scheme has no fsspec implementation installed."""


class SnapshotStateError(CheckpointError, ValueError):
    """The state given to :class:`~tml_checkpointing.Snapshot` cannot be saved or restored."""


class CheckpointWriteError(CheckpointError, OSError):
    """Writing a checkpoint failed; nothing was committed at that step."""


class RankSaveError(CheckpointWriteError):
    """In a job of several ranks, another rank's part of a checkpoint failed or never came
    (its writer or its process died, or it took longer than the rank timeout); nothing was
    committed, and the next save starts afresh."""


class CheckpointMismatchError(CheckpointError, KeyError):
    """The checkpoint does not hold what the caller asked to restore."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class SnapshotEntryNotFoundError(CheckpointError, LookupError):
    """A partial load named an entry the snapshot's manifest does not have."""


class InvalidPartitionNameError(CheckpointError, ValueError):
    """An evaluation partition name that cannot be stored as a done-marker."""


class StepTypeError(CheckpointError, TypeError):
    """``Snapshot.save`` was given something other than an integer step."""


class InvalidStepError(CheckpointError, ValueError):
    """A step number that cannot name a checkpoint (negative)."""


class CorruptCheckpointError(CheckpointError):
    """A committed checkpoint whose files do not match what was recorded when it was written.

    ``path`` names the offending file (or the checkpoint, when its commit marker itself is
    unreadable); ``checkpoint`` is the checkpoint directory.
    """

    def __init__(
        self, message: str, *, checkpoint: str = "", path: str = "", problem: str = ""
    ) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
        self.path = path
        self.problem = problem


# What is wrong with a corrupt checkpoint decides what its reader can do about it.
CorruptionKind = Literal["data", "marker", "sidecar", "chain"]

_RESUME_OLDER = "Resume from an older checkpoint: get_latest_valid_checkpoint(save_dir) skips it"
REMEDIES: Final[Mapping[CorruptionKind, str]] = {
    # Data bytes that differ from the sidecar. A size check sees a short or missing file; a
    # flipped bit only a checksum sees (verify="full"), or a read like this one.
    "data": (
        "Do not restore from it. Resume from an older checkpoint: "
        "get_latest_valid_checkpoint(save_dir, verify='full') skips it, and so does the default "
        "once it is moved aside (quarantine_checkpoint)"
    ),
    # The marker is the table of contents: nothing in the checkpoint can be found without it.
    "marker": f"Nothing in it can be read. {_RESUME_OLDER}",
    # Without the sidecar, no byte of the checkpoint can be checked.
    "sidecar": f"Its data can no longer be checked. {_RESUME_OLDER}",
    # A delta whose chain does not hold stands for a state that can no longer be rebuilt.
    "chain": f"The state it stands for can no longer be rebuilt. {_RESUME_OLDER}",
}


def corrupt_message(checkpoint: str, path: str, problem: str, kind: CorruptionKind) -> str:
    """The one wording of "this checkpoint is corrupt": where, what, and the remedy."""
    where = f"{path}: " if path else ""
    return f"checkpoint {checkpoint} is corrupt: {where}{problem}. {REMEDIES[kind]}."


def corrupt_checkpoint(
    checkpoint: str, path: str, problem: str, *, kind: CorruptionKind
) -> CorruptCheckpointError:
    """The :class:`CorruptCheckpointError` for ``problem`` with ``path`` (relative to
    ``checkpoint``); every site that finds corruption builds its error here."""
    return CorruptCheckpointError(
        corrupt_message(checkpoint, path, problem, kind),
        checkpoint=checkpoint,
        path=path,
        problem=problem,
    )


class BrokenChainError(CorruptCheckpointError):
    """A delta checkpoint (incremental saves) whose chain cannot be followed: a parent gone,
    saved again, or not holding what the delta refers to. Its own files may be fine; the state
    it stands for can no longer be rebuilt. ``at`` is the checkpoint whose link failed."""

    def __init__(self, message: str, *, checkpoint: str, path: str, at: str, problem: str) -> None:
        super().__init__(message, checkpoint=checkpoint, path=path, problem=problem)
        self.at = at


class NotASaveDirError(CheckpointError, ValueError):
    """A command that works on a ``save_dir`` was given a checkpoint (or something inside one).

    Pruning or cleaning *inside* a checkpoint would treat its rank directory ``0/`` as a
    half-written checkpoint; this refusal keeps a typo from deleting data.
    """


class MaterializeDestinationError(CheckpointError, ValueError):
    """``materialize`` was given a destination inside a ``save_dir`` (or a save_dir itself).

    A materialized copy holds the state of another step under a name readers take for a
    step of that run: resuming would start from it (its saved step, not its name) and skip
    work, or report a checkpoint that does not exist. Materialize to a path outside every
    save_dir.
    """


class PreemptedError(CheckpointError):
    """Training stopped on a preemption signal after writing a final checkpoint.

    ``step`` is the step of that checkpoint (``None`` when none could be written),
    ``signal_name`` the signal received, ``exit_code`` the conventional ``128 + signum``
    (143 for SIGTERM) a process should exit with so that schedulers treat it as retryable.
    """

    def __init__(self, message: str, *, step: int | None, signal_name: str, exit_code: int) -> None:
        super().__init__(message)
        self.step = step
        self.signal_name = signal_name
        self.exit_code = exit_code


class InvalidArgumentError(CheckpointError, ValueError):
    """An argument out of range (a negative age, a count below 1, ...)."""


class SaveDirLockedError(CheckpointError, BlockingIOError):
    """Another live writer holds the ``save_dir`` (see :class:`~tml_checkpointing.WriterLock`)."""


class CheckpointReadError(CheckpointError, OSError):
    """Reading a checkpoint (or listing a save_dir) failed: permission denied, connection
    refused or reset, a timeout.

    Not corruption: nothing was read that could be judged wrong, so a checkpoint that could not
    be read is never skipped, moved aside or deleted because of it. Fix access and retry.
    """


class StorageLocationNotFoundError(CheckpointError, FileNotFoundError):
    """The storage a URL points into does not exist (an S3 bucket, ...); it is never created
    implicitly: create it yourself, or fix the URL."""


class InvalidStorageUrlError(CheckpointError, ValueError):
    """A URL that cannot name a place to store checkpoints (``s3://`` with no bucket, ...)."""


class CheckpointShapeMismatchError(CheckpointError, ValueError):
    """A checkpoint's tensors do not fit the state being restored (another model shape or
    recipe). Retrying cannot help; the message names the first mismatching tensor."""


class BadInputError(CheckpointError, ValueError):
    """What a ``tml checkpoints`` command was asked cannot be done as asked (exit code 2)."""
