"""The training side of the writer process: start it, hand it staged saves, relay its events.

One writer process per :class:`~tml_checkpointing.Snapshot` (started at its first save that can
take this path, stopped by ``close()``). A save is handed over as one JSON line; a thread of the
training process then waits for the writer's answer and re-emits its commit-protocol events
here, in the training process, where callers subscribe to them (crash tests pause on them).
Before the writer may write the sidecar and the marker, this side checks that the run still
holds its writer lock, and answers ``abort`` if not.

If the writer process dies, the save fails with :class:`CheckpointWriteError` (nothing was
committed: the marker comes last) and the next save starts a new writer. If the training
process dies, the writer's pipes close: it stops at its next event or when the save in hand is
done (that checkpoint is complete: it was staged whole before ``save()`` returned). No
``PR_SET_PDEATHSIG`` here: Linux ties it to the *thread* that started the child, and the
thread that saves (a Prefect task's, say) may end long before the run does.
"""

from __future__ import annotations

import atexit
import base64
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
from types import TracebackType
from typing import IO, Any

from .. import events
from ..errors import CheckpointError, CheckpointWriteError
from ..storage.filesystem import StorageOptions
from ..storage.locking import assert_holding
from .staging import StagedSave, StagingArea

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


class WriterSave:
    """One save handed to the writer; ``thread`` ends when it is committed or has failed.

    Shaped like torchsnapshot's pending snapshot (``thread``, ``exc_info``), so that
    :class:`~tml_checkpointing.writing.pending.PendingSave` handles both paths the same way.
    """

    def __init__(
        self, writer: WriterProcess, command: dict[str, Any], save_dir: str, area: StagingArea
    ) -> None:
        self.exc_info: ExcInfo | None = None
        self._area: StagingArea | None = area  # keeps the block alive while it is written
        self._writer = writer
        self._command = command
        self._save_dir = save_dir
        self.thread = threading.Thread(target=self._run, name="tml-writer-relay", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self._writer.exchange(self._command, self._on_event)
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

    def submit(
        self,
        url: str,
        save_dir: str,
        storage_options: StorageOptions,
        area: StagingArea,
        staged: StagedSave,
    ) -> WriterSave:
        command = save_command(url, storage_options, area, staged)
        return WriterSave(self, command, save_dir, area)

    def exchange(self, command: dict[str, Any], on_event: Any) -> None:
        """Send one save; relay its events; raise :class:`CheckpointWriteError` if it failed."""
        with self._lock:
            process = self._running()
            stdin, stdout = _pipes(process)
            forgotten = []
            while self._forgotten:  # pop, not copy-and-clear: a finalizer may append meanwhile
                forgotten.append(self._forgotten.pop())
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
                    return
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
        if process is None:
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
            if process.stdout is not None:
                process.stdout.close()

    def start(self) -> None:
        """Start the writer now, from the thread that saves (not from a relay thread)."""
        with self._lock:
            self._running()

    def _running(self) -> subprocess.Popen[str]:
        if self._process is None or self._process.poll() is not None:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "tml_checkpointing.writing.writer_main"],
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


_shared: WriterProcess | None = None
_shared_lock = threading.RLock()  # re-entrant: a finalizer may run while it is held


def shared_writer() -> WriterProcess:
    """The process-wide writer (one child per training process, started on first use).

    One for all snapshots of the process: starting a Python that imports torch costs ~1-2 s
    and ~200 MB, and saves are written one after the other anyway.
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
