"""Crash-loop helper: a zygote that forks saver processes for the test to SIGKILL.

Importing torch costs ~1.7 s; forking an already-initialised process costs milliseconds, so
the 50+ kills of the crash test stay fast while each victim is still a real, separate process
doing real I/O. Protocol on stdin/stdout, one line each:

    test -> zygote:  "<save_dir>"          zygote -> test: "child <pid>"
    child -> test:   "started", then "committed <step>" after each committed save
    zygote -> test:  "exited <pid> <wait status>" once the child is dead

Each child resumes from the newest valid checkpoint, then saves steps forever with weights
``expected_weights(step)`` and prunes to the last 2 after each commit, so kills also land
inside prune.
"""

from __future__ import annotations

import os
import sys

import torch

from tml_checkpointing import (
    RetentionPolicy,
    Snapshot,
    get_latest_valid_checkpoint,
    prune,
)

SHAPES = [(512, 512), (512, 512), (256, 512), (64, 256)]


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
    """One line in one write(2): a SIGKILL cannot cut it in half (print may write the text and
    the newline separately, and a torn "committed 2" then runs into the zygote's next line)."""
    os.write(1, f"{message}\n".encode())


def child(save_dir: str) -> None:
    model = make_model()
    snapshot = Snapshot(save_dir, {"model": model})
    latest = get_latest_valid_checkpoint(save_dir, verify="size")
    step = 0
    if latest:
        snapshot.restore(latest)
        step = snapshot.step + 1
    say("started")
    while True:
        load_weights(model, expected_weights(step))
        snapshot.save(step).wait()
        say(f"committed {step}")
        prune(save_dir, RetentionPolicy(keep_last=2))
        step += 1


def main() -> None:
    torch.set_num_threads(1)
    say("ready")
    for line in sys.stdin:
        save_dir = line.strip()
        if not save_dir:
            continue
        pid = os.fork()
        if pid == 0:
            try:
                child(save_dir)
            finally:
                os._exit(3)
        say(f"child {pid}")
        _, status = os.waitpid(pid, 0)
        say(f"exited {pid} {status}")


if __name__ == "__main__":
    main()
