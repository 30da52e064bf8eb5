"""One rank of a 2-rank TorchRec job that saves every step and stops where a test tells it to.

Run by tests/test_rank_kills.py under ``python -m torch.distributed.run``:

    rank_kill_saver.py --save-dir DIR --final-step F [--incremental] [--resume]
                       [--pause RANK:MOMENT:STEP ...] [--control DIR] [--out PATH]
                       [--rank-timeout SECONDS]

The model is tests/helpers/dist_torchrec.py's (two row-wise sharded tables with fused
row-wise Adagrad, a dense layer with Adam). Step ``s`` trains on ``batch(s)`` and saves
``<DIR>/<s>``, so a job resumed from checkpoint ``k`` sees the same batches from ``k + 1`` on
as an uninterrupted one: their final states must be equal, bit for bit.

Why a program of its own: a crash test has to stop a rank, or the writer process of a rank,
at a moment the rank *reports*, never after a guessed delay. Every rank writes, with one
``os.write`` each (a SIGKILL cannot tear a line; two ranks share torchrun's stdout but never
mix a line), lines starting with ``@@ <rank>``:

* ``pid <pid>`` once, after the process group is up;
* ``event <name> <step> [<detail>]`` for every library event (``tml_checkpointing.events``),
  and for ``writer.taken``: a save's relay thread just got the writer process that will write
  it (``<detail>`` = ``<op> <writer pid>``). From that moment on the save is bound to that
  process: if it dies, the save fails (it is not restarted for this save);
* ``paused <name> <step> <pid>`` at a ``--pause`` moment; the emitting thread then blocks until
  the test writes a line to ``<control>/rank-<rank>`` (a FIFO), or kills the process;
* ``returned <step> <full|delta>`` when ``save()`` returned (what the ranks decided);
* ``saved <step>`` / ``failed <step> <seconds waited> <type> <cause type> <message as JSON>``
  after ``wait()``;
* ``restored <step>`` (``--resume``), ``done`` at the end (rank 0 then wrote ``--out``).

``--rank-timeout``: how long rank 0 waits for the other ranks' parts (and they for its
outcome). There is no public setting for it; the default of ``RankChannel.of_job`` is
replaced here, before the first save makes the channel.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from tests.helpers.dist_torchrec import batch, build, full_state
from tml_checkpointing import CheckpointWriteError, Event, Snapshot, get_checkpoint
from tml_checkpointing import events as library_events
from tml_checkpointing.writing import rank_commit, writer_process

WRITER_TAKEN = "writer.taken"
# Generous: a rank the test holds at a pause leaves the other waiting in a training
# collective; a dead rank is noticed by torchrun, which stops the job, not by this timeout.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=300)
MIN_CHAINED_BYTES = 64  # the tables are tiny: chain them anyway
MAX_CHAIN_FRACTION = 10.0  # most rows change every step: keep the deltas anyway


def say(rank: int, message: str) -> None:
    """One line on stdout, whole (one ``write``; lines under PIPE_BUF never interleave)."""
    os.write(1, f"@@ {rank} {message}\n".encode())


def step_of(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


class Pauses:
    """Reports events; at a chosen (moment, step), blocks the reporting thread until the test
    writes a line to this rank's control FIFO (or kills the process)."""

    def __init__(self, rank: int, specs: list[str], control: str) -> None:
        self.rank = rank
        self.moments = set()
        for spec in specs:
            spec_rank, moment, step = spec.split(":")
            if int(spec_rank) == rank:
                self.moments.add((moment, step))
        # O_RDWR: never blocks on open, and reads block until the test writes (this process
        # holds a writer end itself, so there is never an end-of-file).
        self.fd = os.open(control, os.O_RDWR) if self.moments else -1
        self.lock = threading.Lock()

    def report(self, name: str, path: str, detail: str = "") -> None:
        step = step_of(path)
        say(self.rank, f"event {name} {step}{' ' + detail if detail else ''}")
        if (name, step) not in self.moments:
            return
        with self.lock:  # one pause at a time reads the FIFO
            say(self.rank, f"paused {name} {step} {os.getpid()}")
            self._read_line()

    def on_event(self, event: Event) -> None:
        detail = ""
        if event.name == library_events.SAVE_FAILED:
            detail = json.dumps(str(event.fields.get("error", "")))
        self.report(event.name, event.path, detail)

    def _read_line(self) -> None:
        while os.read(self.fd, 1) not in (b"\n", b""):
            pass


_exchange_of = threading.local()  # the command a relay thread is exchanging with the writer


def report_writer_taken(pauses: Pauses) -> None:
    """Instrument the writer's handle: report (and maybe pause) when a save's relay thread has
    the writer process that will carry the save out, before it sends the command.

    Why there: killing the writer any earlier is no crash for the save (the next command
    starts a fresh writer); from here on the save is bound to this process.
    """
    exchange = writer_process.WriterProcess.exchange
    running = writer_process.WriterProcess._running

    def exchange_reported(self: Any, command: dict[str, Any], on_event: Any) -> dict[str, Any]:
        _exchange_of.command = command
        try:
            return exchange(self, command, on_event)
        finally:
            _exchange_of.command = None

    def running_reported(self: Any) -> Any:
        process = running(self)
        command = getattr(_exchange_of, "command", None)
        if command is not None and "url" in command:
            pauses.report(WRITER_TAKEN, command["url"], f"{command['op']} {process.pid}")
        return process

    writer_process.WriterProcess.exchange = exchange_reported  # type: ignore[method-assign]
    writer_process.WriterProcess._running = running_reported  # type: ignore[method-assign]


def shorten_rank_timeout(seconds: float) -> None:
    """Make the job's rank channel (made at the first save) wait ``seconds`` for parts."""
    of_job: Callable[..., Any] = rank_commit.RankChannel.of_job.__func__  # type: ignore[attr-defined]
    of_job.__defaults__ = (datetime.timedelta(seconds=seconds),)


def steps(start: int, final: int) -> Iterator[int]:
    yield from range(start + 1, final + 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--save-dir", required=True)
    parser.add_argument("--final-step", type=int, required=True)
    parser.add_argument("--incremental", action="store_true")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--pause", action="append", default=[])
    parser.add_argument("--control", default="")
    parser.add_argument("--out", default="")
    parser.add_argument("--rank-timeout", type=float, default=0.0)
    args = parser.parse_args()

    dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    rank = dist.get_rank()
    say(rank, f"pid {os.getpid()}")
    control = os.path.join(args.control, f"rank-{rank}") if args.control else ""
    pauses = Pauses(rank, args.pause, control)
    library_events.subscribe(pauses.on_event)
    report_writer_taken(pauses)
    if args.rank_timeout:
        shorten_rank_timeout(args.rank_timeout)

    dmp, opt = build("row", seed=1)
    snapshot = Snapshot(
        args.save_dir,
        {"model": dmp, "optimizer": opt},
        incremental=args.incremental,
        min_chained_bytes=MIN_CHAINED_BYTES,
        max_chain_fraction=MAX_CHAIN_FRACTION,
    )
    start = 0
    if args.resume:
        newest = get_checkpoint(args.save_dir, missing_ok=True)
        if newest:
            snapshot.restore(newest)
            start = snapshot.step
        say(rank, f"restored {start}")
    for step in steps(start, args.final_step):
        opt.zero_grad()
        dmp(batch(step)).pow(2).mean().backward()
        opt.step()
        pending = snapshot.save(step)
        kind = "delta" if pending.link is not None and pending.link.is_delta else "full"
        say(rank, f"returned {step} {kind}")
        started = time.monotonic()
        try:
            pending.wait()
        except CheckpointWriteError as error:
            waited = time.monotonic() - started
            cause = type(error.__cause__).__name__
            message = json.dumps(str(error))
            say(rank, f"failed {step} {waited:.2f} {type(error).__name__} {cause} {message}")
        else:
            say(rank, f"saved {step}")
    state = full_state(dmp, opt)
    snapshot.close()
    if rank == 0 and args.out:
        torch.save(state, args.out)
    say(rank, "done")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
