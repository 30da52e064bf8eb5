"""Crash-loop helper: a zygote that forks saver processes for the test to SIGKILL.

Importing torch costs ~1.7 s; forking an already-initialised process costs milliseconds, so
the many kills of the crash test stay fast while each victim is still a real, separate process
doing real I/O. Protocol on stdin/stdout, one line each, every line one ``os.write``
(see event_protocol.py):

    test -> zygote:  {"save_dir": ..., "pause": "<event name>", "occurrence": N}   (JSON)
    zygote -> test:  "child <pid>"
    child -> test:   "started <step resumed from, or -1>"
                     "event <name> <path>"   for every library event (tml_checkpointing.events)
                     "paused <name> <path>"  at the N-th event named <name>; the thread that
                                             emitted it then blocks until the test kills it
    zygote -> test:  "exited <pid> <wait status>" once the child is dead

With ``--incremental`` (opt-in; tests/test_incremental_crash.py) each child saves through an
incremental ``Snapshot`` (``full_every=FULL_EVERY``) the state ``incremental_state(step)``: a
table of which a few % of rows change per step (saved as deltas) and a small dense layer that
changes every step. The order may add ``"only_full": true``: count only the ``pause`` events
of checkpoints whose chain link is a full one (depth 0) -- known for deletions, where the
test wants "prune half-done, its victim a chain base". After each save's ``wait`` the child
also reports, before it prunes:

    child -> test:   "link <step> <ChainLink JSON>"

Each child resumes from the newest valid checkpoint, then saves steps forever with weights
``expected_weights(step)`` (waiting for each save) and prunes to the last 2 after each commit,
so the events run in one fixed order: save.started, data_written, sidecar_written, committed,
then delete.started/uncommitted/done per pruned checkpoint. A pause therefore stops the whole
child at that exact point of the commit or prune protocol.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch

from tests.helpers.event_protocol import Reporter, write_line
from tml_checkpointing import (
    Event,
    RetentionPolicy,
    Snapshot,
    get_checkpoints,
    get_latest_valid_checkpoint,
    prune,
    step_from_checkpoint,
    subscribe,
)
from tml_checkpointing.format.chain_link import ChainLink
from tml_checkpointing.reading.chains import read_chain_link

SHAPES = [(512, 512), (512, 512), (256, 512), (64, 256)]
KEEP_LAST = 2


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(*[torch.nn.Linear(i, o) for o, i in SHAPES])


def expected_weights(step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    tensors = []
    for out_features, in_features in SHAPES:
        tensors.append(torch.randn(out_features, in_features, generator=generator))
        tensors.append(torch.randn(out_features, generator=generator))
    return tensors


def load_weights(model: torch.nn.Module, tensors: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for parameter, value in zip(model.parameters(), tensors, strict=True):
            parameter.copy_(value)


def say(message: str) -> None:
    write_line(1, message)


def child(save_dir: str, pause: str, occurrence: int) -> None:
    subscribe(Reporter(1, pause, occurrence))
    model = make_model()
    snapshot = Snapshot(save_dir, {"model": model})
    latest = get_latest_valid_checkpoint(save_dir, verify="size")
    step = 0
    if latest:
        snapshot.restore(latest)
        step = snapshot.step + 1
    say(f"started {step - 1}")
    while True:
        load_weights(model, expected_weights(step))
        snapshot.save(step).wait()
        prune(save_dir, RetentionPolicy(keep_last=KEEP_LAST))
        step += 1


# -- incremental mode (--incremental) --------------------------------------------------------

TABLE_ROWS, TABLE_DIM = 2048, 64  # 512 KiB of float32: chained (MIN_CHAINED_BYTES below)
CHANGED_ROWS = 61  # ~3% of the table changes per step
DENSE_SHAPE = (32, 64)  # 8 KiB: written whole in every save
MIN_CHAINED_BYTES = 64 * 1024
FULL_EVERY = 4


class IncrementalModel(torch.nn.Module):
    """An embedding table (sparse updates) and a dense layer (changes every step)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(TABLE_ROWS, TABLE_DIM)
        self.dense = torch.nn.Linear(DENSE_SHAPE[1], DENSE_SHAPE[0], bias=False)


def incremental_snapshot(save_dir: str, model: torch.nn.Module) -> Snapshot:
    return Snapshot(
        save_dir,
        {"model": model},
        incremental=True,
        full_every=FULL_EVERY,
        min_chained_bytes=MIN_CHAINED_BYTES,
    )


def advance_table(table: torch.Tensor, step: int) -> None:
    """Rewrite the rows step ``step`` changes (a pure function of the step), in place."""
    generator = torch.Generator().manual_seed(1_000_000 + step)
    rows = torch.randperm(TABLE_ROWS, generator=generator)[:CHANGED_ROWS]
    table[rows] = torch.randn(CHANGED_ROWS, TABLE_DIM, generator=generator)


def dense_weights(step: int) -> torch.Tensor:
    return torch.randn(*DENSE_SHAPE, generator=torch.Generator().manual_seed(2_000_000 + step))


def incremental_state(step: int) -> dict[str, torch.Tensor]:
    """The model's state_dict at ``step``: the table of step 0 with steps 1..step applied."""
    table = torch.randn(TABLE_ROWS, TABLE_DIM, generator=torch.Generator().manual_seed(7))
    for done in range(1, step + 1):
        advance_table(table, done)
    return {"table.weight": table, "dense.weight": dense_weights(step)}


class KindReporter(Reporter):
    """A :class:`Reporter` that, with ``only_full``, counts only events of full checkpoints."""

    def __init__(self, pause: str, occurrence: int, only_full: bool) -> None:
        super().__init__(1, pause, occurrence)
        self.only_full = only_full
        self.links: dict[int, ChainLink] = {}  # step -> link of each committed checkpoint

    def __call__(self, event: Event) -> None:
        if self.only_full and event.name == self.pause:
            link = self.links.get(step_from_checkpoint(event.path))
            if link is None or link.is_delta:
                write_line(self.fd, f"event {event.name} {event.path}")
                return
        super().__call__(event)


def incremental_child(save_dir: str, pause: str, occurrence: int, only_full: bool) -> None:
    reporter = KindReporter(pause, occurrence, only_full)
    subscribe(reporter)
    model = IncrementalModel()
    snapshot = incremental_snapshot(save_dir, model)
    latest = get_latest_valid_checkpoint(save_dir, verify="size")
    step = 0
    if latest:
        snapshot.restore(latest)
        expected = incremental_state(snapshot.step)
        for name, value in model.state_dict().items():  # a wrong restore ends the child
            if not torch.equal(value, expected[name]):
                raise AssertionError(f"{latest} restored a wrong {name}")
        step = snapshot.step + 1
    for checkpoint in get_checkpoints(save_dir):
        link = read_chain_link(checkpoint)
        if link is not None:
            reporter.links[step_from_checkpoint(checkpoint)] = link
    say(f"started {step - 1}")
    with torch.no_grad():
        model.load_state_dict(incremental_state(max(step - 1, 0)))
        while True:
            if step:
                advance_table(model.table.weight, step)
            model.dense.weight.copy_(dense_weights(step))
            pending = snapshot.save(step)
            pending.wait()
            assert pending.link is not None, "an incremental save recorded no chain link"
            reporter.links[step] = pending.link
            say(f"link {step} {pending.link.to_json()}")
            prune(save_dir, RetentionPolicy(keep_last=KEEP_LAST))
            step += 1


def main() -> None:
    incremental = "--incremental" in sys.argv[1:]
    torch.set_num_threads(1)
    say("ready")
    for line in sys.stdin:
        if not line.strip():
            continue
        order = json.loads(line)
        pid = os.fork()
        if pid == 0:
            try:
                if incremental:
                    incremental_child(
                        order["save_dir"],
                        order["pause"],
                        int(order["occurrence"]),
                        bool(order.get("only_full", False)),
                    )
                else:
                    child(order["save_dir"], order["pause"], int(order["occurrence"]))
            except BaseException:
                traceback.print_exc()  # to stderr: the test sees "exited" with status 3
            finally:
                os._exit(3)
        say(f"child {pid}")
        _, status = os.waitpid(pid, 0)
        say(f"exited {pid} {status}")


if __name__ == "__main__":
    main()
