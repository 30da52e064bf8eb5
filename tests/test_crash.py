"""Crash loop: SIGKILL a saving (and pruning) process at random moments, then resume.

After every kill, the newest valid checkpoint must verify at level "full", be the newest
*committed* one (a crash must never leave a committed-but-broken checkpoint), be at least the
last step the victim reported committed, and restore the exact weights saved at its step.
"""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tml_checkpointing import (
    Snapshot,
    get_checkpoint,
    get_checkpoints,
    get_latest_valid_checkpoint,
    step_from_checkpoint,
    verify_checkpoint,
)

from .conftest import S3Server
from .helpers.crash_saver import expected_weights, make_model

HELPER = Path(__file__).parent / "helpers" / "crash_saver.py"
REPO = Path(__file__).resolve().parents[1]

LOCAL_KILLS = 55
S3_KILLS = 5


class Zygote:
    """The crash_saver helper process; reads its stdout on a thread so waits can time out."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.process = subprocess.Popen(
            [sys.executable, str(HELPER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        assert self.next_line(60) == "ready"

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.strip())
        self.lines.put("<eof>")

    def next_line(self, timeout: float = 60) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"helper said nothing for {timeout}s") from None

    def run_and_kill(self, save_dir: str, delay_s: float) -> list[int]:
        """Start a saver, SIGKILL it ``delay_s`` after it said "started"; its committed steps."""
        assert self.process.stdin is not None
        self.process.stdin.write(f"{save_dir}\n")
        self.process.stdin.flush()
        line = self.next_line()
        assert line.startswith("child "), line
        pid = int(line.split()[1])
        assert self.next_line() == "started"
        # The random moment of the crash (not a synchronisation: any moment must be safe).
        time.sleep(delay_s)
        os.kill(pid, signal.SIGKILL)
        committed: list[int] = []
        while True:
            line = self.next_line()
            if line.startswith("committed "):
                committed.append(int(line.split()[1]))
            elif line.startswith("exited "):
                status = int(line.split()[2])
                assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, line
                return committed
            else:
                raise AssertionError(f"unexpected helper output {line!r}")

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote(s3_server: S3Server) -> Iterator[Zygote]:
    """Started after the S3 fixture so it inherits the AWS_* endpoint variables."""
    helper = Zygote()
    yield helper
    helper.close()


def check_after_kill(save_dir: str, reported: int | None) -> int | None:
    latest = get_latest_valid_checkpoint(save_dir, verify="full")
    if reported is None and not latest:
        return None
    assert latest, f"nothing to resume from although step {reported} was reported committed"
    assert latest == get_checkpoint(save_dir), "the newest committed checkpoint did not verify"
    for checkpoint in get_checkpoints(save_dir):
        assert verify_checkpoint(checkpoint, level="full").status == "valid", checkpoint
    step = step_from_checkpoint(latest)
    assert reported is None or step >= reported
    model = make_model()
    Snapshot(save_dir, {"model": model}).restore(latest, verify="none")
    for restored, expected in zip(model.parameters(), expected_weights(step), strict=True):
        assert torch.equal(restored, expected)
    return step


def crash_loop(zygote: Zygote, save_dir: str, kills: int, seed: int) -> int:
    moments = random.Random(seed)
    reported: int | None = None
    latest: int | None = None
    for _ in range(kills):
        committed = zygote.run_and_kill(save_dir, moments.uniform(0.1, 0.5))
        if committed:
            reported = committed[-1]
        latest = check_after_kill(save_dir, reported)
    return -1 if latest is None else latest


def test_sigkill_at_random_moments_local(zygote: Zygote, tmp_path: Path) -> None:
    final = crash_loop(zygote, str(tmp_path / "run"), LOCAL_KILLS, seed=20261129)
    assert final > 0, "no kill happened after a commit: the loop tested nothing"


def test_sigkill_at_random_moments_s3(zygote: Zygote, s3_save_dir: str) -> None:
    final = crash_loop(zygote, s3_save_dir, S3_KILLS, seed=7)
    assert final >= 0
