"""The writer process: writes staged checkpoints to storage, outside the training process.

Started by :class:`~tml_checkpointing.writing.writer_process.WriterProcess` as
``python -m tml_checkpointing.writing.writer_main``; speaks JSON lines on stdin/stdout:

* in: ``{"op": "save", "url": ..., "storage_options": ..., "shm": NAME, "data_file": REL,
  "data_size": N, "objects": {REL: base64}, "metadata": YAML, "environ": {...}}`` (a delta
  save also ``"delta": {"file": REL, "gathers": [...]}``, see :mod:`.staged_write`; a save
  written in pieces ``"commit": false``: its files only, see below);
  ``{"op": "commit", "url": ..., "storage_options": ..., "metadata": YAML,
  "records": [SIDECAR JSON, ...], "environ": {...}}``: the pieces' records merged, then the
  commit protocol; ``{"op": "ping"}``; or ``{"op": "exit"}``; any command may list
  ``"forget": [NAME, ...]``, staging blocks the training process freed (unmapped here first);
* out, during a save or commit: ``{"event": NAME, "fields": {...}}`` for each commit-protocol
  event, answered by ``ack`` (go on) or ``abort`` (the training process lost its lock, say)
  on stdin;
* out, at the end: ``{"ok": true}`` (a ``"commit": false`` save adds ``"records"``, the
  sidecar JSON of the files it wrote; a ping adds ``"pid"`` and ``"modules"``, what this
  process has imported) or ``{"ok": false, "error": TEXT, "errno": N}``.

Writing goes through :class:`~tml_checkpointing.storage.checkpoint_files.CheckpointFiles`, the
same as every other save (torchsnapshot's plugin delegates to it): data (fsynced, block
checksums recorded as written), objects, then the commit protocol (sidecar, files-still-there
check, marker last, claim removed). Why a process: the training process's GIL and cores stay
with training while the bytes are hashed and written. The staging block is shared memory,
mapped here, never copied.

Why no torch: this process only moves bytes, hashes them and talks to fsspec. Importing torch
and torchsnapshot cost a fresh writer seconds before its first commit (tens of seconds on a
loaded machine); without them it is ready well before the first save, as it is started when a
``Snapshot`` is made. Nothing imported from here may import torch (a test asks a running
writer what it has imported).

The process ends when its parent (``--parent-pid``) does, however it dies: within a tenth of
a second, whatever this process is doing
(:func:`~tml_checkpointing.writing.parent_death.watch_parent`), and at the latest when the
closed pipes fail its next read or write. A checkpoint it was writing then stays uncommitted
(no marker), as after any crash, unless the parent had already answered its last event.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from multiprocessing import resource_tracker, shared_memory
from typing import Any, TextIO

from .. import events
from ..storage.checkpoint_files import CheckpointFiles
from .parent_death import watch_parent
from .staged_write import write_staged

WRITER_NICENESS = 5


class AbortedByParentError(RuntimeError):
    """The training process refused to let this save commit (it lost its writer lock)."""


class _Channel:
    def __init__(self, inbox: TextIO, outbox: TextIO) -> None:
        self.inbox, self.outbox = inbox, outbox

    def send(self, message: dict[str, Any]) -> None:
        """Send one line; a closed pipe (the training process died) stops this process.

        ``SystemExit``, not the ``OSError``: a send from inside ``events.emit`` (the relay)
        must not be swallowed as a subscriber's error, or the save would go on to its marker
        without the training process's lock check."""
        try:
            self.outbox.write(json.dumps(message) + "\n")
            self.outbox.flush()
        except OSError:
            raise SystemExit(0) from None

    def receive(self) -> str:
        line = self.inbox.readline()
        if not line:
            raise SystemExit(0)  # the training process closed the pipe (or died): stop
        return line.strip()


class _Relay:
    """Sends every event to the training process and waits for its answer.

    ``events.emit`` never lets a subscriber's error escape, so a refusal is remembered here
    and raised by :meth:`check` right before the marker (``CheckpointFiles.before_marker``).
    """

    def __init__(self, channel: _Channel) -> None:
        self.channel = channel
        self.refused_at = ""

    def __call__(self, event: events.Event) -> None:
        fields = {k: str(v) for k, v in event.fields.items()}
        self.channel.send({"event": event.name, "fields": fields})
        if self.channel.receive() != "ack":
            self.refused_at = event.name

    def check(self) -> None:
        if self.refused_at:
            raise AbortedByParentError(
                f"the training process stopped the save at {self.refused_at} (it lost its "
                "writer lock); nothing was committed"
            )


def _attach(name: str, cache: dict[str, shared_memory.SharedMemory]) -> memoryview:
    if name not in cache:
        memory = shared_memory.SharedMemory(name=name)
        # The training process owns the block; this process must not unlink it at exit
        # (Python 3.11's resource tracker would, as if it had created it).
        resource_tracker.unregister(memory._name, "shared_memory")  # type: ignore[attr-defined]
        cache[name] = memory
    buffer = cache[name].buf
    assert buffer is not None
    return buffer


def _files(command: dict[str, Any], relay: _Relay) -> CheckpointFiles:
    """The checkpoint's files, with the environment the training process has now
    (credentials, endpoints: this process may have started before they were set)."""
    relay.refused_at = ""
    if os.environ != command["environ"]:
        os.environ.clear()
        os.environ.update(command["environ"])
    files = CheckpointFiles(command["url"], command["storage_options"])
    files.before_marker = relay.check
    return files


def _save(
    command: dict[str, Any], blocks: dict[str, shared_memory.SharedMemory], relay: _Relay
) -> dict[str, Any]:
    files = _files(command, relay)
    commit = bool(command.get("commit", True))
    write_staged(files, _attach(command["shm"], blocks), command, commit=commit)
    return {} if commit else {"records": files.records().decode()}


def _commit(command: dict[str, Any], relay: _Relay) -> dict[str, Any]:
    """Commit a save written in pieces: every piece's records, then the commit protocol."""
    files = _files(command, relay)
    for index, records in enumerate(command["records"]):
        files.merge_records(records.encode(), source=f"piece {index}")
    files.commit(command["metadata"].encode())
    return {}


def _ping() -> dict[str, Any]:
    """Who this process is and what it has imported (tests check it never imports torch)."""
    return {"pid": os.getpid(), "modules": sorted(sys.modules)}


def _run(
    command: dict[str, Any], blocks: dict[str, shared_memory.SharedMemory], relay: _Relay
) -> dict[str, Any]:
    """Carry out one command; the fields its ``{"ok": true}`` answer adds."""
    if command["op"] == "commit":
        return _commit(command, relay)
    if command["op"] == "ping":
        return _ping()
    return _save(command, blocks, relay)


def _errno(error: BaseException | None) -> int | None:
    """The first ``errno`` in the error's cause/context chain, if any."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno is not None:
            return error.errno
        error = error.__cause__ or error.__context__
    return None


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tml_checkpointing.writing.writer_main")
    parser.add_argument("--parent-pid", type=int, help="end when this process is gone")
    parent = parser.parse_args().parent_pid
    if parent is not None:  # first: a parent gone already, or while we work, ends us at once
        watch_parent(parent)
    # SIGINT/SIGTERM are ignored from the start (set by the parent before exec, see
    # writer_process._ignore_stop_signals); again here for a writer started by hand.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Background work, once started (imports at full priority): when cores are scarce,
    # training steps come first. Mildly: at nice 10 a writer competing with a training loop
    # that fills every core got ~10% of one and took many times longer to drain.
    os.nice(WRITER_NICENESS)
    # The channel gets the real stdout; anything a library prints goes to stderr instead.
    channel = _Channel(sys.stdin, os.fdopen(os.dup(1), "w"))
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    relay = _Relay(channel)
    events.subscribe(relay)
    blocks: dict[str, shared_memory.SharedMemory] = {}
    while True:
        command = json.loads(channel.receive())
        if command["op"] == "exit":
            return 0
        for name in command.get("forget", []):  # blocks the training process has freed
            memory = blocks.pop(name, None)
            if memory is not None:
                with contextlib.suppress(BufferError):  # a view still alive: unmapped with it
                    memory.close()
        try:
            answer = _run(command, blocks, relay)
        except Exception as error:
            # The errno travels too: "disk full" must stay recognisable (not retried).
            channel.send(
                {"ok": False, "error": f"{type(error).__name__}: {error}", "errno": _errno(error)}
            )
        else:
            channel.send({"ok": True, **answer})


if __name__ == "__main__":
    sys.exit(main())
