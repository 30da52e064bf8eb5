"""``Snapshot``: save and restore training state as torchsnapshot checkpoints on any fsspec URL.

``Snapshot(save_dir, state).save(step)`` writes ``<save_dir>/<step>`` in the background and
returns at once; the checkpoint holds the state as it was when ``save`` returned. ``restore``
brings state, ``step`` and ``walltime`` back. The format is torchsnapshot's, so plain
``torchsnapshot.Snapshot(path).restore(...)`` reads a local checkpoint written here.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Iterable, Mapping, MutableMapping
from types import TracebackType
from typing import Any, Literal

import torch
import torch.distributed as dist
import torchsnapshot
from torch.nn.parallel import DistributedDataParallel
from torchsnapshot import RNGState, StateDict

from . import events
from .chains import ChainedTensor, ancestry, chained_tensors, link_of, logical_metadata
from .claims import write_claim
from .discovery import get_checkpoint, is_committed, step_from_checkpoint
from .errors import (
    CheckpointExistsError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointReadError,
    CheckpointWriteError,
    CorruptCheckpointError,
    InvalidArgumentError,
    InvalidStepError,
    SaveDirLockedError,
    SnapshotEntryNotFoundError,
    SnapshotStateError,
    StepTypeError,
)
from .fast_restore import can_verify, plan_restore, read_chained_tensor, run_restore
from .faults import reading
from .filesystem import StorageOptions, is_local, join_url, resolve
from .incremental import (
    DEFAULT_FULL_EVERY,
    DELTA_ROOT,
    MAX_CHAIN_FRACTION,
    MIN_CHAINED_BYTES,
    ChainLink,
)
from .integrity import (
    VERIFY_LEVELS,
    VerifyLevel,
    read_metadata,
    read_sidecar,
    verify_checkpoint,
)
from .layout import INTEGRITY_SIDECAR, step_name
from .locking import assert_holding
from .shapes import check_restore_shapes
from .sidecar import Sidecar, SidecarFormatError
from .staging import (
    ChainRequest,
    SavePlan,
    StagingArea,
    flatten_state,
    plan_key,
    plan_save,
    shared_memory_room,
)
from .storage_plugin import TRANSPORT_SCHEME, VERIFY_READS_OPTION, transport_url
from .torchsnapshot_compat import KeyFilteredSnapshot, in_process_barrier_store
from .writer_process import WriterSave, shared_writer
from .writer_thread import ThreadSave

logger = logging.getLogger(__name__)

EXTRA_STATE = "extra_state"
WriterChoice = Literal["auto", "process", "torchsnapshot"]
WRITER_CHOICES: tuple[WriterChoice, ...] = ("auto", "process", "torchsnapshot")
# Filesystems a separate process reaches with the same URL and options (memory:// is
# per process; schemes registered at runtime, like the tests' faulty://, are not known there).
_SHARED_PROTOCOLS = frozenset({"file", "local", "s3", "s3a", "gs", "gcs", "abfs", "az"})


def _writer_process_reaches(fs: Any, storage_options: StorageOptions) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if not _SHARED_PROTOCOLS & set(protocols):
        return False
    try:
        json.dumps(dict(storage_options))
    except (TypeError, ValueError):
        return False  # options that cannot be sent to another process (client objects, ...)
    return True


class _Staging:
    """The Snapshot's staging block: planned for one state layout, replaced when it changes."""

    def __init__(self) -> None:
        self.area: StagingArea | None = None

    def fits(self, leaves: Mapping[str, Any]) -> bool:
        return self.area is not None and self.area.plan.key == plan_key(leaves)

    def replan(self, plan: SavePlan) -> None:
        self.release()
        self.area = StagingArea(plan, on_free=_forget_block)

    def release(self) -> None:
        area, self.area = self.area, None
        if area is not None:
            area.close()


def _forget_block(name: str) -> None:
    shared_writer().forget(name)


class PendingSave:
    """Handle on a checkpoint being written in the background."""

    def __init__(
        self,
        path: str,
        global_step: int,
        pending: torchsnapshot.snapshot.PendingSnapshot | WriterSave | ThreadSave,
        link: ChainLink | None = None,
    ) -> None:
        self.path = path
        self.global_step = global_step
        self.link = link  # an incremental save's place in its chain
        self._pending = pending
        self._started = time.monotonic()
        self.error_reported = False  # the failure was already raised to a caller
        self.committed = False  # a wait() saw it committed

    def done(self) -> bool:
        """Whether writing has finished (successfully or not): ``wait`` will not block."""
        return not self._pending.thread.is_alive()

    def wait(self, timeout: float | None = None) -> str:
        """Block until the checkpoint is committed; return its path.

        Raises :class:`CheckpointWriteError` when writing failed (nothing was committed) and
        ``TimeoutError`` when ``timeout`` seconds pass first.
        """
        self._pending.thread.join(timeout)
        if self._pending.thread.is_alive():
            raise TimeoutError(f"checkpoint {self.path} still being written after {timeout}s")
        if self._pending.exc_info is not None:
            cause = self._pending.exc_info[1]
            if not self.error_reported:  # one event per failed save, however often waited on
                events.emit(
                    events.SAVE_FAILED, path=self.path, step=self.global_step, error=repr(cause)
                )
            self.error_reported = True
            if isinstance(cause, SaveDirLockedError):
                raise cause  # the run lost its writer lock: it must stop, not retry the save
            raise CheckpointWriteError(
                f"saving step {self.global_step} to {self.path} failed, nothing was committed: "
                f"{type(cause).__name__}: {cause}"
            ) from cause
        self.committed = True
        return self.path

    def __repr__(self) -> str:
        state = "done" if self.done() else "writing"
        return f"PendingSave(path={self.path!r}, {state})"


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

    The writer process (:mod:`tml_checkpointing.writer_process`): ``save()`` copies the
    tensors into a shared-memory staging block allocated once (re-planned when shapes
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
    ) -> None:
        fs, _ = resolve(save_dir, storage_options)  # an unknown protocol fails here, not later
        if writer not in WRITER_CHOICES:
            raise SnapshotStateError(f"writer must be one of {WRITER_CHOICES}, got {writer!r}")
        if isinstance(full_every, bool) or not isinstance(full_every, int) or full_every < 1:
            raise InvalidArgumentError(
                f"full_every must be a positive integer (saves per chain), got {full_every!r}"
            )
        if incremental and writer == "torchsnapshot":
            raise SnapshotStateError(
                "incremental saves need the staging writer (it holds the last saved copy to "
                "compare with); use writer='auto' or 'process'"
            )
        if not isinstance(min_chained_bytes, int) or min_chained_bytes < 1:
            raise InvalidArgumentError(
                f"min_chained_bytes must be a positive integer, got {min_chained_bytes!r}"
            )
        if not 0 <= max_chain_fraction <= 10:
            raise InvalidArgumentError(
                "max_chain_fraction (how much a chain's deltas may add up to, as a fraction of "
                f"a full checkpoint) must be between 0 and 10, got {max_chain_fraction!r}"
            )
        self.max_chain_fraction = float(max_chain_fraction)
        self.incremental = bool(incremental)
        self.full_every = full_every
        self.min_chained_bytes = min_chained_bytes
        # The newest committed save of this Snapshot's chain, whose values the staging block
        # still holds: the parent of the next incremental save (None: the next one is full).
        self._tip: tuple[str, ChainLink] | None = None
        self._last_save: PendingSave | None = None
        self._warned_full = False
        self.save_dir = save_dir
        self.storage_options: StorageOptions = dict(storage_options or {})
        self.writer: WriterChoice = writer
        self._writer_reachable = _writer_process_reaches(fs, self.storage_options)
        self._staging = _Staging()  # its block is freed by close(), or with the last reference
        # Why this state cannot be staged (sharded, GPU, ...): found once, not on every save
        # (finding out costs a state_dict() walk); cleared when the state is replaced.
        self._unstageable = ""
        self._extra_state = StateDict(step=0, walltime=0.0)
        self._state: dict[str, Any] = {EXTRA_STATE: self._extra_state}
        self._pending: PendingSave | None = None
        if state is not None:
            self.state = state

    # -- state -----------------------------------------------------------------------------

    @property
    def state(self) -> MutableMapping[str, Any]:
        """The objects saved and restored, including ``extra_state``."""
        return self._state

    @state.setter
    def state(self, state: Mapping[str, Any]) -> None:
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
        if EXTRA_STATE in state:
            # A dict that already went through a Snapshot (the original tml code mutated it).
            self._extra_state.update(dict(state[EXTRA_STATE]))
        self._state = {k: v for k, v in state.items() if k != EXTRA_STATE}
        self._state[EXTRA_STATE] = self._extra_state
        self._unstageable = ""
        self._tip = None

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
        if isinstance(global_step, bool) or not isinstance(global_step, int):
            raise StepTypeError(
                f"Snapshot.save(global_step) takes the integer training step, got "
                f"{type(global_step).__name__}. The state to save is the dict given as "
                "Snapshot(save_dir, state) (or set through snapshot.state), not an argument "
                "of save()."
            )
        if global_step < 0:
            raise InvalidStepError(f"global_step must be >= 0, got {global_step}")
        if len(self._state) == 1:
            raise SnapshotStateError(
                "nothing to save: give the objects to checkpoint as Snapshot(save_dir, state) "
                "or assign snapshot.state = {'model': model, ...} before save()"
            )
        self.wait()
        self._settle_chain(global_step)
        assert_holding(self.save_dir, self.storage_options)  # a run that lost its lock stops
        path = join_url(self.save_dir, step_name(global_step))
        try:
            committed = is_committed(path, self.storage_options)
        except CheckpointReadError as error:  # a save that cannot look cannot write either
            raise CheckpointWriteError(
                f"saving step {global_step} to {path} failed, nothing was committed: {error}"
            ) from error
        if committed:
            raise CheckpointExistsError(
                f"checkpoint {path} is already committed; refusing to overwrite it. Save under "
                "another step or another save_dir."
            )
        events.emit(events.SAVE_STARTED, path=path, step=global_step)
        try:
            write_claim(path, self.storage_options)  # before any data: cleanup keeps off it
        except CheckpointWriteError as error:
            events.emit(events.SAVE_FAILED, path=path, step=global_step, error=repr(error))
            raise CheckpointWriteError(
                f"saving step {global_step} to {path} failed, nothing was committed: {error}"
            ) from error
        self.step = global_step
        started = time.monotonic()
        try:
            pending, how, link = self._start_writing(path)
        except SnapshotStateError:
            raise  # writer="process" for a state it cannot take: the caller's choice to fix
        except Exception as error:
            self._tip = None  # the staging may hold rows of this save, which is not committed
            events.emit(events.SAVE_FAILED, path=path, step=global_step, error=repr(error))
            raise CheckpointWriteError(
                f"saving step {global_step} to {path} failed, nothing was committed: "
                f"{type(error).__name__}: {error}"
            ) from error
        logger.info(
            "Saving step %s to %s (%s in %.3fs).",
            global_step,
            path,
            how,
            time.monotonic() - started,
        )
        self._pending = self._last_save = PendingSave(path, global_step, pending, link)
        return self._pending

    def _settle_chain(self, global_step: int) -> None:
        """After the previous save settled: it is the next delta's parent if it committed
        (and holds a link, and is older), else the next incremental save is a full one."""
        last, self._last_save = self._last_save, None
        if last is None:
            return
        self._tip = None
        if last.committed and last.link is not None and last.global_step < global_step:
            self._tip = (last.path, last.link)

    def _chain_request(self) -> ChainRequest:
        """The next incremental save's parent: the tip, if it is still committed."""
        full = ChainRequest(None, None, self.full_every, self.max_chain_fraction)
        if self._tip is None:
            return full
        parent_path, link = self._tip
        if not is_committed(parent_path, self.storage_options):
            logger.warning("%s is gone: the next checkpoint is a full one.", parent_path)
            self._tip = None
            return full
        name = parent_path.rstrip("/").rsplit("/", 1)[-1]
        return ChainRequest(name, link, self.full_every, self.max_chain_fraction)

    def _start_writing(
        self, path: str
    ) -> tuple[
        torchsnapshot.snapshot.PendingSnapshot | WriterSave | ThreadSave, str, ChainLink | None
    ]:
        """Stage the state and start writing it: through the writer process if it can take
        it, else through torchsnapshot's writer thread."""
        staged = self._stage_for_writer(path)
        if staged is not None:
            save, link = staged
            how = "staged for the writer process"
            if isinstance(save, ThreadSave):
                how = "staged for a writer thread"
            if link is not None:
                how += f", {'delta' if link.is_delta else 'full'} (chain depth {link.depth})"
            return save, how, link
        app_state = {
            key: value if _must_pass_through(value) else _ConsistentStateful(value)
            for key, value in self._state.items()
        }
        with in_process_barrier_store():
            pending = torchsnapshot.Snapshot.async_take(
                path=transport_url(path),
                app_state=app_state,
                storage_options=self.storage_options,
            )
        return pending, "staged", None

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
            self._staging.release()

    def _stage_for_writer(
        self, path: str
    ) -> tuple[WriterSave | ThreadSave, ChainLink | None] | None:
        """Stage the state and hand it to the writer process (or, for an incremental save to
        a store only this process reaches, a writer thread); ``None``: use torchsnapshot."""
        if self.writer == "torchsnapshot":
            return None
        why_not = self._why_not_writer_process()
        containers, leaves = flatten_state(self._state) if not why_not else ({}, {})
        if not why_not and not self._staging.fits(leaves):
            self._tip = None  # a new block holds no saved copy to compare with
            plan = plan_save(leaves, self.incremental, self.min_chained_bytes)
            if plan is None:
                why_not = "the state holds sharded, distributed or non-CPU tensors"
                self._unstageable = why_not
            elif not shared_memory_room(plan.size):
                why_not = f"/dev/shm has no room for a {plan.size / 2**20:.0f} MiB staging block"
                logger.warning("Saving through torchsnapshot's writer thread: %s.", why_not)
            else:
                self._staging.replan(plan)
        if why_not:
            if self.writer == "process":
                raise SnapshotStateError(f"writer='process' cannot save this state: {why_not}")
            if self.incremental and not self._warned_full:
                logger.warning("Incremental saves are off for %s: %s.", self.save_dir, why_not)
                self._warned_full = True
            return None
        area = self._staging.area
        assert area is not None
        chain = self._chain_request() if self.incremental else None
        staged = area.stage(containers, leaves, chain=chain)
        if not self._writer_reachable:
            return ThreadSave(path, self.storage_options, area, staged), staged.link
        writer = shared_writer()
        writer.start()
        save = writer.submit(path, self.save_dir, self.storage_options, area, staged)
        return save, staged.link

    def _why_not_writer_process(self) -> str:
        if self._unstageable:
            return self._unstageable
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return "several ranks save collectively through torchsnapshot"
        if not self._writer_reachable and not self.incremental:
            return "the writer process cannot reach this storage (memory:// or a custom scheme)"
        return ""

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
        if verify not in VERIFY_LEVELS:
            raise SnapshotStateError(f"verify must be one of {VERIFY_LEVELS}, got {verify!r}")
        with reading(f"checkpoint {checkpoint}"):
            self._restore(checkpoint, keys, verify)

    def _restore(self, checkpoint: str, keys: Iterable[str] | None, verify: VerifyLevel) -> None:
        if not is_committed(checkpoint, self.storage_options):
            raise CheckpointNotFoundError(
                f"{checkpoint} is not a committed checkpoint (no .snapshot_metadata); use "
                "get_checkpoint(save_dir) to find the latest one"
            )
        if verify != "none":
            # Sizes up front (one listing: catches missing and truncated files before any
            # state changes); with "full", every byte is then hashed as it is read.
            report = verify_checkpoint(
                checkpoint, level="size", storage_options=self.storage_options
            )
            if report.status == "unverified":
                logger.info("%s has no integrity sidecar; restoring it unverified.", checkpoint)
        wanted = list(self._state) if keys is None else list(dict.fromkeys(keys))
        unknown = [key for key in wanted if key not in self._state]
        if unknown:
            raise SnapshotStateError(
                f"cannot restore {unknown}: not in this Snapshot's state {sorted(self._state)}"
            )
        snapshot = KeyFilteredSnapshot(
            transport_url(checkpoint),
            storage_options={**self.storage_options, VERIFY_READS_OPTION: verify == "full"},
        )
        # A delta checkpoint: its chained tensors come from its ancestors (found, and their
        # links checked, before anything is read); the logical metadata lists them too.
        metadata, chained = snapshot.metadata, None
        link = link_of(metadata, checkpoint)
        if link is not None and link.is_delta:
            fs, root = resolve(checkpoint, self.storage_options)
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
        app_state = {key: self._state[key] for key in wanted if key != EXTRA_STATE}
        saved_extra = StateDict()
        if EXTRA_STATE in wanted and EXTRA_STATE in saved_keys:
            app_state[EXTRA_STATE] = saved_extra
        check_restore_shapes(metadata, app_state, checkpoint)  # before any byte lands
        if not self._restore_in_place(checkpoint, metadata, app_state, verify, chained):
            if chained:
                raise SnapshotStateError(
                    f"{checkpoint} is a delta checkpoint, which restores only into plain CPU "
                    "tensors of one process; materialize it first (`tml checkpoints "
                    "materialize`) to restore it another way"
                )
            snapshot.restore(app_state)
        if EXTRA_STATE in wanted:
            self.step = int(saved_extra.get("step", step_from_checkpoint(checkpoint)))
            self.walltime = float(saved_extra.get("walltime", 0.0))
        logger.info("Restored %s in %.3fs.", checkpoint, time.monotonic() - started)

    def _restore_in_place(
        self,
        checkpoint: str,
        metadata: Any,
        app_state: dict[str, Any],
        verify: VerifyLevel,
        chained: dict[str, ChainedTensor] | None,
    ) -> bool:
        """The fast path (:mod:`~tml_checkpointing.fast_restore`) when it applies (a delta
        checkpoint takes it on any filesystem: it is the only path that follows chains)."""
        fs, directory = resolve(checkpoint, self.storage_options)
        if not is_local(fs) and not chained:
            return False
        plan = plan_restore(metadata, app_state, directory.rstrip("/"), chained)
        if plan is None:
            return False
        sidecars = _sidecars(fs, plan.directories, checkpoint) if verify == "full" else {}
        if not can_verify(plan, sidecars):
            return False
        run_restore(plan, app_state, fs, sidecars, checkpoint)
        return True

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
        tensors = _tensor_entries(torch_snapshot.get_manifest())
        checkpoint = torch_snapshot.path.removeprefix(f"{TRANSPORT_SCHEME}://")
        link = link_of(torch_snapshot.metadata, checkpoint)
        chained = {t.path for t in link.tensors} if link is not None and link.is_delta else set()
        tensors.update({path: (f"0/{path}", []) for path in chained})
        tensors = {path: found for path, found in tensors.items() if not _is_delta_part(path)}
        exact = snapshot_emb_name.strip("/")
        if exact in tensors:
            chosen = exact
        else:
            matches = [path for path in tensors if snapshot_emb_name in path]
            if len(matches) != 1:
                listing = ", ".join(sorted(matches or tensors)[:30])
                problem = "is ambiguous" if matches else "matches no tensor"
                raise SnapshotEntryNotFoundError(
                    f"{snapshot_emb_name!r} {problem} in snapshot {torch_snapshot.path}; "
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
        raise CorruptCheckpointError(
            f"checkpoint {checkpoint} is corrupt: {why}", checkpoint=checkpoint, path=path
        )
    chained = chained_tensors(ancestry(checkpoint, metadata, fs, root))[path]
    roots = {chained.base[0].root, *(delta[0].root for delta in chained.deltas)}
    read_chained_tensor(fs, chained, out, _sidecars(fs, roots, checkpoint), checkpoint)


def _sidecars(fs: Any, roots: Iterable[str], checkpoint: str) -> dict[str, Sidecar | None]:
    """The sidecar of each checkpoint directory a restore reads from (a chain spans several);
    one that does not parse makes ``checkpoint`` corrupt."""
    sidecars: dict[str, Sidecar | None] = {}
    for root in roots:
        try:
            sidecars[root] = read_sidecar(fs, root, checkpoint)
        except SidecarFormatError as error:
            raise CorruptCheckpointError(
                f"checkpoint {checkpoint} is corrupt: {root}/{INTEGRITY_SIDECAR}: {error}",
                checkpoint=checkpoint,
                path=INTEGRITY_SIDECAR,
            ) from error
    return sidecars


def _is_delta_part(path: str) -> bool:
    return path == DELTA_ROOT or path.startswith(f"{DELTA_ROOT}/")


_TENSOR_ENTRY_TYPES = {"Tensor", "ShardedTensor", "ChunkedTensor", "DTensor"}


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


def _must_pass_through(value: Any) -> bool:
    """torchsnapshot inspects these types itself (RNG ordering, DDP replication)."""
    return isinstance(value, RNGState | DistributedDataParallel)


class _ConsistentStateful:
    """Makes a save independent of later in-place changes to non-tensor state.

    torchsnapshot copies tensors before ``async_take`` returns, but pickles other leaves
    (lists, numpy arrays, custom objects) later, in the background. Copying those leaves at
    save time keeps the promise that the checkpoint is the state as of ``save``.
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def state_dict(self) -> Any:
        state_dict = self._inner.state_dict()
        keep_tensors = {id(t): t for t in _tensors_in(state_dict)}
        return copy.deepcopy(state_dict, memo=keep_tensors)

    def load_state_dict(self, state_dict: Any) -> None:
        self._inner.load_state_dict(state_dict)


def _tensors_in(value: Any) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors_in(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors_in(item)
