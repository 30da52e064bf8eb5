"""How crash tests learn where a process is: its library events, one line each.

In the process under test, :class:`Reporter` is subscribed to ``tml_checkpointing.events``:

    "event <name> <path>"    for every event, as it happens
    "paused <name> <path>"   at the chosen occurrence of the chosen event; the thread that
                             emitted it then blocks until the test kills the process

each written with one ``os.write`` (a SIGKILL cannot tear a line, two threads cannot mix
theirs). On the test side, :class:`LineReader` reads such lines with timeouts and
:class:`DirModel` replays them into what the save_dir must hold, to compare with storage.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass, field
from typing import IO

from tml_checkpointing import (
    DELETE_DONE,
    DELETE_UNCOMMITTED,
    SAVE_COMMITTED,
    SAVE_DATA_WRITTEN,
    SAVE_SIDECAR_WRITTEN,
    Event,
)


def write_line(fd: int, message: str) -> None:
    os.write(fd, f"{message}\n".encode())


class Reporter:
    """Reports every event on ``fd``; at the ``occurrence``-th ``pause`` event, blocks."""

    def __init__(self, fd: int, pause: str | None = None, occurrence: int = 1) -> None:
        self.fd = fd
        self.pause = pause
        self.remaining = occurrence

    def __call__(self, event: Event) -> None:
        write_line(self.fd, f"event {event.name} {event.path}")
        if event.name != self.pause:
            return
        self.remaining -= 1
        if self.remaining == 0:
            write_line(self.fd, f"paused {event.name} {event.path}")
            threading.Event().wait()  # until SIGKILL: nothing after this moment happens


def parse_pause(spec: str) -> tuple[str, int]:
    """``"save.committed:2"`` -> ``("save.committed", 2)``; the occurrence defaults to 1."""
    name, _, count = spec.partition(":")
    return name, int(count or 1)


class LineReader:
    """Lines of a text stream, read on a thread so that each wait can time out."""

    EOF = "<eof>"

    def __init__(self, stream: IO[str]) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        with stream:
            for line in stream:
                self.lines.put(line.rstrip("\n"))
        self.lines.put(self.EOF)

    def next_line(self, timeout: float) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line for {timeout}s") from None


@dataclass
class DirModel:
    """What a save_dir must hold, replayed from reported events (step numbers)."""

    committed: set[int] = field(default_factory=set)
    incomplete: set[int] = field(default_factory=set)  # uncommitted step directories
    sidecars: set[int] = field(default_factory=set)  # incomplete ones holding a sidecar

    def apply(self, name: str, step: int) -> None:
        if name == SAVE_DATA_WRITTEN:
            self.incomplete.add(step)
        elif name == SAVE_SIDECAR_WRITTEN:
            self.sidecars.add(step)
        elif name == SAVE_COMMITTED:
            self.incomplete.discard(step)
            self.sidecars.discard(step)
            self.committed.add(step)
        elif name == DELETE_UNCOMMITTED:
            self.committed.remove(step)
            self.incomplete.add(step)
            self.sidecars.add(step)
        elif name == DELETE_DONE:
            self.incomplete.discard(step)
            self.sidecars.discard(step)
