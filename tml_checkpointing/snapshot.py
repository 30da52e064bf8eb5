"""``Snapshot``: save and restore training state as torchsnapshot checkpoints on any fsspec URL.

``Snapshot(save_dir, state).save(step)`` writes ``<save_dir>/<step>`` in the background and
returns at once; the checkpoint holds the state as it was when ``save`` returned. ``restore``
brings state, ``step`` and ``walltime`` back. The format is torchsnapshot's, so plain
``torchsnapshot.Snapshot(path).restore(...)`` reads a local checkpoint written here.

A facade: the writer paths are :mod:`tml_checkpointing.writing.writers` (started after the
steps of :mod:`~tml_checkpointing.writing.save_protocol`), the incremental chain's tip is
:mod:`~tml_checkpointing.writing.chain_cursor`, the restore path
:mod:`tml_checkpointing.reading.restore`. This class holds the state and the order of calls.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, MutableMapping
from types import TracebackType
from typing import Any

import torch
import torchsnapshot
from torchsnapshot import StateDict

from . import events
from .catalog.discovery import get_checkpoint
from .errors import InvalidStepError, SnapshotStateError, StepTypeError
from .format.layout import EXTRA_STATE
from .format.torchsnapshot_compat import KeyFilteredSnapshot
from .reading.restore import restore_state
from .reading.verify import VerifyLevel
from .reading.weights import load_tensor
from .storage.filesystem import StorageOptions, resolve
from .storage.plugin import transport_url
from .writing.chain_cursor import ChainCursor
from .writing.incremental import DEFAULT_FULL_EVERY, MAX_CHAIN_FRACTION, MIN_CHAINED_BYTES
from .writing.pending import PendingSave
from .writing.save_protocol import open_save, save_failed
from .writing.writers import WRITER_CHOICES, Staging, WriterChoice, Writers

__all__ = ["EXTRA_STATE", "WRITER_CHOICES", "PendingSave", "Snapshot", "WriterChoice"]

logger = logging.getLogger(__name__)


class Snapshot:
    """Checkpoints a dict of stateful objects (modules, optimizers, ...) with torchsnapshot.

    Args:
        save_dir: where checkpoints go, as a local path or any fsspec URL
            (``s3://bucket/run``, ``memory://run``, ``gs://...``).
        state: ``{name: stateful}``; may also be given later through :attr:`state`.
        storage_options: passed to the fsspec filesystem (e.g. s3fs ``endpoint_url``).
        writer: ``"auto"`` (default) writes through the writer process when the state allows
            it (one process; CPU tensors; local disk or an object store such as S3), else
            through torchsnapshot; ``"process"`` requires the writer process;
            ``"torchsnapshot"`` always uses torchsnapshot's writer thread.
        incremental: save only the rows of large tensors (at least ``min_chained_bytes``)
            that changed since the previous save; every ``full_every``-th save is full, and
            so is one that would take the chain's deltas past ``max_chain_fraction`` of a full
            checkpoint (bounds a restore's extra reads). See docs/incremental.md.
        background_staging: ``save()`` returns before the state is copied; the copy runs in
            a thread while training goes on, and the state's optimizers' next ``step`` (and
            its modules' next backward pass, where TorchRec's fused optimizers update rows)
            waits for the copy to end, so a checkpoint is never torn. For training loops that
            change the saved tensors only through those (see
            :mod:`tml_checkpointing.writing.background`); ``PendingSave.staged()`` waits for
            the copy.

    The writer process (:mod:`tml_checkpointing.writing.writer_process`): ``save()`` copies
    the tensors into a shared-memory staging block allocated once (re-planned when shapes
    change) and returns; a separate process hashes and writes the block as one large
    sequential file and commits, so training keeps its cores and its GIL. Same format, same
    commit protocol, same sidecar. ``close()`` frees the staging block.

    ``state`` gains the entry ``extra_state`` holding ``step`` and ``walltime``; the caller's
    dict is not modified.
    """

    def __init__(
        self,
        save_dir: str,
        state: Mapping[str, Any] | None = None,
        *,
        storage_options: StorageOptions | None = None,
        writer: WriterChoice = "auto",
        incremental: bool = False,
        full_every: int = DEFAULT_FULL_EVERY,
        min_chained_bytes: int = MIN_CHAINED_BYTES,
        max_chain_fraction: float = MAX_CHAIN_FRACTION,
        background_staging: bool = False,
    ) -> None:
        fs, _ = resolve(save_dir, storage_options)  # an unknown protocol fails here, not later
        self.save_dir = save_dir
        self.storage_options: StorageOptions = dict(storage_options or {})
        self.writer: WriterChoice = writer
        self.incremental = bool(incremental)
        self._staging = Staging()  # its block is freed by close(), or with the last reference
        self._writers = Writers(
            save_dir,
            self.storage_options,
            fs,
            writer=writer,
            incremental=self.incremental,
            min_chained_bytes=min_chained_bytes,
            staging=self._staging,
            background_staging=background_staging,
        )
        self._chain = ChainCursor(full_every, max_chain_fraction)
        self._extra_state = StateDict(step=0, walltime=0.0)
        self._state: dict[str, Any] = {EXTRA_STATE: self._extra_state}
        self._pending: PendingSave | None = None
        if state is not None:
            self.state = state
        self._writers.start_writer_soon()  # never blocks; ready by the first save

    # -- state -----------------------------------------------------------------------------

    @property
    def state(self) -> MutableMapping[str, Any]:
        """The objects saved and restored, including ``extra_state``."""
        return self._state

    @state.setter
    def state(self, state: Mapping[str, Any]) -> None:
        _check_state(state)
        if EXTRA_STATE in state:
            # A dict that already went through a Snapshot (the original tml code mutated it).
            self._extra_state.update(dict(state[EXTRA_STATE]))
        self._state = {k: v for k, v in state.items() if k != EXTRA_STATE}
        self._state[EXTRA_STATE] = self._extra_state
        self._writers.forget_state()
        self._chain.reset()

    @property
    def step(self) -> int:
        return int(self._extra_state["step"])

    @step.setter
    def step(self, step: int) -> None:
        self._extra_state["step"] = step

    @property
    def walltime(self) -> float:
        return float(self._extra_state["walltime"])

    @walltime.setter
    def walltime(self, walltime: float) -> None:
        self._extra_state["walltime"] = walltime

    # -- saving ----------------------------------------------------------------------------

    def save(self, global_step: int) -> PendingSave:
        """Start writing ``<save_dir>/<global_step>``; return a handle to wait on.

        The checkpoint captures the state as of this call: training may go on and mutate it
        at once. A save still running from an earlier call is waited for first, so at most
        one copy of the state is in flight and checkpoints commit in order.
        """
        _check_step(global_step)
        if len(self._state) == 1:
            raise SnapshotStateError(
                "nothing to save: give the objects to checkpoint as Snapshot(save_dir, state) "
                "or assign snapshot.state = {'model': model, ...} before save()"
            )
        self.wait()
        self._chain.settle(global_step)
        path = open_save(self.save_dir, global_step, self.storage_options)
        self.step = global_step
        started = time.monotonic()
        try:
            pending, how, link = self._writers.start(path, self._state, self._chain)
        except SnapshotStateError:
            raise  # writer="process" for a state it cannot take: the caller's choice to fix
        except Exception as error:
            self._chain.reset()  # the staging may hold rows of this save, not committed
            events.emit(events.SAVE_FAILED, path=path, step=global_step, error=repr(error))
            raise save_failed(global_step, path, f"{type(error).__name__}: {error}") from error
        elapsed = time.monotonic() - started
        logger.info("Saving step %s to %s (%s in %.3fs).", global_step, path, how, elapsed)
        self._pending = PendingSave(path, global_step, pending, link)
        self._chain.saved(self._pending)
        return self._pending

    def wait(self) -> str | None:
        """Wait for the save in flight, if any; return its path."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        if pending.error_reported:
            # The caller already got this failure from PendingSave.wait(); raising it again
            # here would make every later save() fail for a checkpoint long given up on.
            return None
        return pending.wait()

    def close(self) -> None:
        """Wait for pending saves (and surface their errors); free the staging block."""
        try:
            self.wait()
        finally:
            self._writers.gate.release_hooks()
            self._staging.release()

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- restoring -------------------------------------------------------------------------

    def restore(
        self,
        checkpoint: str,
        *,
        keys: Iterable[str] | None = None,
        verify: VerifyLevel = "full",
    ) -> None:
        """Restore state, ``step`` and ``walltime`` from a committed checkpoint.

        ``keys`` restores a subset of the state (e.g. ``["model"]`` to warm-start weights);
        ``step``/``walltime`` come back only when ``extra_state`` is among them. A checkpoint
        written before ``walltime`` existed restores ``walltime = 0.0``.

        Verification (``verify``): ``"full"`` (default) checks marker, manifest and file sizes
        first (one listing), then hashes every byte as it is read and compares it with the
        integrity sidecar; ``"size"`` does the first part only; ``"none"`` neither. Corruption
        raises :class:`CorruptCheckpointError` naming the file: found by the size check, before
        any state changed; found while reading, after part of the state may have been
        overwritten (restore an older checkpoint, as ``get_latest_valid_checkpoint`` gives).
        A storage fault raises :class:`~tml_checkpointing.errors.CheckpointReadError`.
        """
        self.wait()
        extra = restore_state(
            checkpoint,
            self._state,
            keys=keys,
            verify=verify,
            storage_options=self.storage_options,
        )
        if extra is not None:
            self.step, self.walltime = extra

    # -- reading without a training state --------------------------------------------------

    @classmethod
    def get_torch_snapshot(
        cls,
        snapshot_path: str,
        global_step: int | None = None,
        missing_ok: bool = False,
        *,
        storage_options: StorageOptions | None = None,
    ) -> torchsnapshot.Snapshot | None:
        """A ``torchsnapshot.Snapshot`` of the latest (or ``global_step``) checkpoint, unread.

        ``snapshot_path`` is the save_dir. ``None`` when nothing is found and ``missing_ok``.
        Its ``.path`` is the internal ``tml-fsspec://`` transport URL.
        """
        path = get_checkpoint(
            snapshot_path, global_step, missing_ok, storage_options=storage_options
        )
        if not path:
            return None
        logger.info("Loading snapshot from %s.", path)
        return KeyFilteredSnapshot(transport_url(path), storage_options=storage_options)

    @classmethod
    def load_snapshot_to_weight(
        cls,
        torch_snapshot: torchsnapshot.Snapshot,
        snapshot_emb_name: str,
        weight_tensor: torch.Tensor,
    ) -> None:
        """Load one tensor of a snapshot (e.g. a pretrained embedding table) in place.

        ``snapshot_emb_name`` is the entry's logical path without the rank
        (``model/embeddings.weight``) or a unique part of it. A table sharded over ranks
        (TorchRec ``ShardedTensor``, saved by any number of ranks under any plan) is read
        whole from every rank's shards into ``weight_tensor``; no process group is needed.
        """
        load_tensor(torch_snapshot, snapshot_emb_name, weight_tensor)


def _check_state(state: Mapping[str, Any]) -> None:
    if not isinstance(state, Mapping):
        raise SnapshotStateError(
            f"state must be a dict of stateful objects, got {type(state).__name__}"
        )
    for key, value in state.items():
        if not isinstance(key, str) or not key or "/" in key:
            raise SnapshotStateError(f"state keys must be non-empty names without '/': {key!r}")
        if key == EXTRA_STATE:
            continue
        if not (hasattr(value, "state_dict") and hasattr(value, "load_state_dict")):
            raise SnapshotStateError(
                f"state[{key!r}] is a {type(value).__name__}, which has no state_dict()/"
                "load_state_dict(); wrap plain values in torchsnapshot.StateDict(...)"
            )


def _check_step(global_step: object) -> None:
    if isinstance(global_step, bool) or not isinstance(global_step, int):
        raise StepTypeError(
            f"Snapshot.save(global_step) takes the integer training step, got "
            f"{type(global_step).__name__}. The state to save is the dict given as "
            "Snapshot(save_dir, state) (or set through snapshot.state), not an argument "
            "of save()."
        )
    if global_step < 0:
        raise InvalidStepError(f"global_step must be >= 0, got {global_step}")
