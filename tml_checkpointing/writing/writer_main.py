"""The writer process: writes staged checkpoints to storage, outside the training process.

Started by :class:`~tml_checkpointing.writing.writer_process.WriterProcess` as
``python -m tml_checkpointing.writing.writer_main``; speaks JSON lines on stdin/stdout:

* in: ``{"op": "save", "url": ..., "storage_options": ..., "shm": NAME, "data_file": REL,
  "data_size": N, "objects": {REL: base64}, "metadata": YAML, "environ": {...}}`` (a delta
  save also ``"delta": {"file": REL, "gathers": [...]}``, see :mod:`.staged_write`),
  or ``{"op": "exit"}``; any command may list ``"forget": [NAME, ...]``, staging blocks the
  training process freed (unmapped here first);
* out, during a save: ``{"event": NAME, "fields": {...}}`` for each commit-protocol event,
  answered by ``ack`` (go on) or ``abort`` (the training process lost its lock, say) on stdin;
* out, at the end of a save: ``{"ok": true}`` or ``{"ok": false, "error": TEXT}``.

Writing goes through the same :class:`~tml_checkpointing.storage.plugin.FsspecStoragePlugin`
as every other save: data (fsynced, block checksums recorded as written), objects, then the
commit protocol (sidecar, files-still-there check, marker last, claim removed). Why a process:
the training process's GIL and cores stay with training while the bytes are hashed and
written. The staging block is shared memory, mapped here, never copied.

The process ends when its parent does: the pipes close, so the next read (a command, or the
answer to an event) or write fails and it exits. A checkpoint it was writing then stays
uncommitted (no marker), as after any crash, unless it was already past its last event.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from multiprocessing import resource_tracker, shared_memory
from typing import Any, TextIO

from .. import events
from ..storage.plugin import FsspecStoragePlugin
from .staged_write import write_staged

WRITER_NICENESS = 5


class AbortedByParentError(RuntimeError):
    """The training process refused to let this save commit (it lost its writer lock)."""


class _Channel:
    def __init__(self, inbox: TextIO, outbox: TextIO) -> None:
        self.inbox, self.outbox = inbox, outbox

    def send(self, message: dict[str, Any]) -> None:
        self.outbox.write(json.dumps(message) + "\n")
        self.outbox.flush()

    def receive(self) -> str:
        line = self.inbox.readline()
        if not line:
            raise SystemExit(0)  # the training process closed the pipe (or died): stop
        return line.strip()


class _Relay:
    """Sends every event to the training process and waits for its answer.

    ``events.emit`` never lets a subscriber's error escape, so a refusal is remembered here
    and raised by :meth:`check` right before the marker (the plugin's ``before_marker``).
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


def _save(
    command: dict[str, Any], blocks: dict[str, shared_memory.SharedMemory], relay: _Relay
) -> None:
    relay.refused_at = ""
    if os.environ != command["environ"]:
        os.environ.clear()
        os.environ.update(command["environ"])
    plugin = FsspecStoragePlugin(command["url"], command["storage_options"])
    plugin.before_marker = relay.check
    write_staged(plugin, _attach(command["shm"], blocks), command)


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
            _save(command, blocks, relay)
        except Exception as error:
            # The errno travels too: "disk full" must stay recognisable (not retried).
            channel.send(
                {"ok": False, "error": f"{type(error).__name__}: {error}", "errno": _errno(error)}
            )
        else:
            channel.send({"ok": True})


if __name__ == "__main__":
    sys.exit(main())
