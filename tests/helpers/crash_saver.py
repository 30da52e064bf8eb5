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
    RetentionPolicy,
    Snapshot,
    get_latest_valid_checkpoint,
    prune,
    subscribe,
)

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


def main() -> None:
    torch.set_num_threads(1)
    say("ready")
    for line in sys.stdin:
        if not line.strip():
            continue
        order = json.loads(line)
        pid = os.fork()
        if pid == 0:
            try:
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
