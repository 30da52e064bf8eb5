"""The training side of the writer process: start it, hand it staged saves, relay its events.

One writer process per training process (:func:`shared_writer`), started in the background
when a :class:`~tml_checkpointing.Snapshot` that may use it is made
(:meth:`WriterProcess.start_soon`: the child imports while training goes on, so the first save
does not wait for an interpreter), stopped at exit. A save is handed over as one JSON line; a
thread of the training process then waits for the writer's answer and re-emits its
commit-protocol events here, in the training process, where callers subscribe to them (crash
tests pause on them). Before the writer may write the sidecar and the marker, this side checks
that the run still holds its writer lock, and answers ``abort`` if not.

A save written in pieces (several ranks, each with its own writer) uses two more steps:
``submit(..., commit=False)`` writes one piece's files and hands back their integrity records
(:attr:`WriterSave.records`); :meth:`WriterProcess.commit` then merges every piece's records
and runs the commit protocol, with the same events, lock check and marker as a single save.

If the writer process dies, the save fails with :class:`CheckpointWriteError` (nothing was
committed: the marker comes last) and the next save starts a new writer. If the training
process dies, however it dies, the writer ends within a tenth of a second
(:func:`~tml_checkpointing.writing.parent_death.watch_parent`, given this process's pid as
``--parent-pid``), whatever it was doing; a save it had not committed stays uncommitted. No
``PR_SET_PDEATHSIG`` here: Linux ties it to the *thread* that started the child, and the
thread that starts the writer (a relay thread, a Prefect task's) may end long before the run.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

from .. import events
from ..errors import CheckpointError, CheckpointWriteError
from ..storage.filesystem import StorageOptions
from ..storage.locking import assert_holding

if TYPE_CHECKING:
    from .staging import StagedSave, StagingArea

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]

logger = logging.getLogger(__name__)


class WriterSave:
    """One save (or commit) handed to the writer; ``thread`` ends when it is done or failed.

    Shaped like torchsnapshot's pending snapshot (``thread``, ``exc_info``), so that
    :class:`~tml_checkpointing.writing.pending.PendingSave` handles both paths the same way.
    ``records``: after ``thread`` ended, for a save submitted with ``commit=False``, the
    integrity records (sidecar JSON) of the files it wrote; ``None`` otherwise.
    """

    def __init__(
        self,
        writer: WriterProcess,
        command: dict[str, Any],
        save_dir: str,
        area: StagingArea | None,
    ) -> None:
        self.exc_info: ExcInfo | None = None
        self.records: bytes | None = None
        self._area: StagingArea | None = area  # keeps the block alive while it is written
        self._writer = writer
        self._command = command
        self._save_dir = save_dir
        self.thread = threading.Thread(target=self._run, name="tml-writer-relay", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            reply = self._writer.exchange(self._command, self._on_event)
            if "records" in reply:
                self.records = str(reply["records"]).encode()
        except BaseException as error:
            self.exc_info = (type(error), error, error.__traceback__)
        finally:
            self._area = None

    def _on_event(self, name: str, fields: dict[str, Any]) -> None:
        """Re-emit here; raising stops the save before its marker (the lock was lost)."""
        events.emit(name, **fields)
        if name == events.SAVE_SIDECAR_WRITTEN:  # the writer's next step is the marker
            assert_holding(self._save_dir)  # SaveDirLockedError: answered "abort"


class WriterProcess:
    """A long-lived ``python -m tml_checkpointing.writing.writer_main`` child and its pipes."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()  # one exchange at a time (saves are sequential anyway)
        self._forgotten: list[str] = []
        self._given_work = False  # the running writer was sent a command (close says goodbye)

    def submit(
        self,
        url: str,
        save_dir: str,
        storage_options: StorageOptions,
        area: StagingArea,
        staged: StagedSave,
        *,
        commit: bool = True,
    ) -> WriterSave:
        """Hand over one staged save. ``commit=False``: write its files only (fsynced,
        recorded; no sidecar, no marker, the claim stays) and keep their integrity records in
        :attr:`WriterSave.records`, for :meth:`commit` (one piece of a save in pieces)."""
        command = save_command(url, storage_options, area, staged)
        if not commit:
            command["commit"] = False
        return WriterSave(self, command, save_dir, area)

    def commit(
        self,
        url: str,
        save_dir: str,
        storage_options: StorageOptions,
        metadata: str,
        records: list[bytes],
    ) -> WriterSave:
        """Commit the checkpoint at ``url`` whose pieces were written with ``commit=False``:
        their ``records`` merged into one sidecar, then the commit protocol of every save
        (files still there, sidecar, this process's lock checked, marker ``metadata`` last,
        claim removed), its events re-emitted here."""
        command: dict[str, Any] = {
            "op": "commit",
            "url": url,
            "storage_options": dict(storage_options),
            "metadata": metadata,
            "records": [piece.decode() for piece in records],
            "environ": dict(os.environ),
        }
        return WriterSave(self, command, save_dir, None)

    def ping(self) -> dict[str, Any]:
        """The writer's answer to a ping (``pid``; ``modules``: what it has imported)."""
        return self.exchange({"op": "ping"}, _no_events)

    def exchange(self, command: dict[str, Any], on_event: Any) -> dict[str, Any]:
        """Send one command; relay its events; its answer (raise :class:`CheckpointWriteError`
        if it failed)."""
        with self._lock:
            process = self._running()
            stdin, stdout = _pipes(process)
            forgotten = []
            while self._forgotten:  # pop, not copy-and-clear: a finalizer may append meanwhile
                forgotten.append(self._forgotten.pop())
            self._given_work = True
            try:
                stdin.write(json.dumps({**command, "forget": forgotten}) + "\n")
                stdin.flush()
                refusal: BaseException | None = None  # why this side stopped the save
                while True:
                    line = stdout.readline()
                    if not line:
                        raise CheckpointWriteError(
                            f"the checkpoint writer process died (exit code {process.wait()}); "
                            "nothing was committed"
                        )
                    reply = json.loads(line)
                    if "event" in reply:
                        if refusal is None:
                            try:
                                on_event(reply["event"], reply["fields"])
                            except BaseException as error:
                                refusal = error
                        stdin.write("ack\n" if refusal is None else "abort\n")
                        stdin.flush()
                        continue
                    if refusal is not None:
                        raise refusal
                    if not reply["ok"]:
                        if reply.get("errno") is not None:  # ENOSPC stays ENOSPC
                            raise CheckpointWriteError(reply["errno"], reply["error"])
                        raise CheckpointWriteError(reply["error"])
                    return dict(reply)
            except OSError as error:
                if isinstance(error, CheckpointError):  # ours (a lost lock, a failed write)
                    raise
                raise CheckpointWriteError(
                    f"the checkpoint writer process is gone ({error}); nothing was committed"
                ) from error
            finally:
                if process.poll() is not None:
                    self._process = None  # the next save starts a fresh writer

    def forget(self, shm_name: str) -> None:
        """The training process freed this staging block: the writer unmaps it with its next
        command. Never blocks (it runs from finalizers, on any thread, at any moment)."""
        self._forgotten.append(shm_name)  # list.append is atomic

    def close(self, timeout: float = 10) -> None:
        """Stop the writer (after the save in flight, which the caller waited for)."""
        with self._lock:
            process, self._process = self._process, None
            given_work, self._given_work = self._given_work, False
        if process is None:
            return
        if not given_work:
            # Started ahead of a save that never came: nothing of it to finish, and no need
            # to wait for its imports to end before it reads "exit".
            process.kill()
            process.wait()
            _close_pipes(process)
            return
        try:
            stdin, _ = _pipes(process)
            stdin.write(json.dumps({"op": "exit"}) + "\n")
            stdin.close()
            process.wait(timeout)
        except (OSError, subprocess.TimeoutExpired):
            process.kill()
            process.wait()
        finally:
            _close_pipes(process)

    def start(self) -> None:
        """Start the writer now, from the thread that saves (not from a relay thread)."""
        with self._lock:
            self._running()

    def start_soon(self) -> None:
        """Start the writer if it is not running, without waiting for anything.

        Popen returns once the child exists; its interpreter starts and imports in parallel
        with whatever this process does next, so it is ready by the first save. Never
        blocks: if a command is in flight (the lock is taken), the writer is running. A start
        that fails here is only logged: the first save starts the writer again, and says why
        if it cannot.
        """
        if self._lock.acquire(blocking=False):
            try:
                self._running()
            except OSError as error:
                logger.warning(
                    "Could not start the checkpoint writer process ahead of the first save "
                    "(%s); the first save tries again.",
                    error,
                )
            finally:
                self._lock.release()

    def _running(self) -> subprocess.Popen[str]:
        if self._process is None or self._process.poll() is not None:
            if self._process is not None:
                _close_pipes(self._process)  # a writer that died: its pipes go with it
            self._given_work = False
            module = "tml_checkpointing.writing.writer_main"
            parent = ["--parent-pid", str(os.getpid())]  # it ends with this process, not thread
            self._process = subprocess.Popen(
                [sys.executable, "-P", "-m", module, *parent],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                preexec_fn=_ignore_stop_signals,  # from its first instruction on
            )
        return self._process


def save_command(
    url: str, storage_options: StorageOptions, area: StagingArea, staged: StagedSave
) -> dict[str, Any]:
    """The JSON command for one staged save (see :mod:`~tml_checkpointing.writing.writer_main`)."""
    command: dict[str, Any] = {
        "op": "save",
        "url": url,
        "storage_options": dict(storage_options),
        "shm": area.name,
        "data_file": staged.data_file,
        "data_size": staged.data_size,
        "objects": {k: base64.b64encode(v).decode() for k, v in staged.objects.items()},
        "metadata": staged.metadata,
        # Credentials and endpoints (AWS_*, ...) as the training process has them now:
        # the writer may have started before they were set.
        "environ": dict(os.environ),
    }
    if staged.delta_file:
        command["delta"] = {
            "file": staged.delta_file,
            "gathers": [dataclasses.asdict(gather) for gather in staged.gathers],
        }
    return command


def _ignore_stop_signals() -> None:
    """In the child before exec (ignored signals stay ignored across exec): Ctrl-C and
    ``kill -- -PGID`` reach the whole group, and the training process answers them by saving
    the step in progress through this writer, which must outlive them. It still ends with the
    training process (its pipes close) and with SIGKILL."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _pipes(process: subprocess.Popen[str]) -> tuple[IO[str], IO[str]]:
    assert process.stdin is not None and process.stdout is not None
    return process.stdin, process.stdout


def _close_pipes(process: subprocess.Popen[str]) -> None:
    for pipe in (process.stdin, process.stdout):
        if pipe is not None:
            with contextlib.suppress(OSError):  # a broken pipe: already as closed as it gets
                pipe.close()


def _no_events(name: str, fields: dict[str, Any]) -> None:
    raise CheckpointWriteError(f"the writer process sent event {name!r} where none was due")


_shared: WriterProcess | None = None
_shared_lock = threading.RLock()  # re-entrant: a finalizer may run while it is held


def shared_writer() -> WriterProcess:
    """The process-wide writer (one child per training process, started on first use).

    One for all snapshots of the process: each child is a Python interpreter (tens of MB,
    a fraction of a second to start even without torch), and saves are written one after the
    other anyway.
    """
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = WriterProcess()
            atexit.register(_shared.close)
        return _shared


def close_shared_writer() -> None:
    """Stop the process-wide writer now (it also stops at exit, or when this process dies)."""
    global _shared
    with _shared_lock:
        writer, _shared = _shared, None
    if writer is not None:
        atexit.unregister(writer.close)
        writer.close()
