"""Preemption: the guard itself, and SIGTERM to a real training process -> final checkpoint,
exit 143, and a resume that ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from tml_checkpointing import (
    InvalidArgumentError,
    PreemptedError,
    PreemptionGuard,
    Snapshot,
    get_latest_valid_checkpoint,
    save_final_checkpoint,
    step_from_checkpoint,
    verify_checkpoint,
)

from .conftest import PrefectServer

REPO = Path(__file__).resolve().parents[1]
LOOP = Path(__file__).parent / "helpers" / "train_loop.py"


def test_guard_sets_flag_and_restores_handlers() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionGuard() as guard:
        assert not guard.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert guard.requested and guard.signal_name == "SIGUSR1"
        assert guard.exit_code == 128 + signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is before


def test_guard_catches_ctrl_c_by_default() -> None:
    """SIGINT (Ctrl-C, or a group signal) is a preemption too: checkpoint, then exit 130."""
    before = signal.getsignal(signal.SIGINT)
    with PreemptionGuard() as guard:
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt
        assert guard.requested and guard.signal_name == "SIGINT"
        assert guard.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is before


def test_flow_guard_honours_a_signal_that_came_after_the_last_step(
    prefect_api: PrefectServer,
) -> None:
    """A signal during the last save has no step left to stop: the run still stops as
    preempted (the train flow ends Preempted; ``tml`` exits 128 + n), naming the last step."""
    from prefect import flow

    from flows.train import preemption_guard

    @flow(name="guard-after-last-step")
    def body() -> None:
        with preemption_guard(lambda: 7) as guard:
            assert guard is not None
            os.kill(os.getpid(), signal.SIGTERM)  # caught by the guard; no step checks it

    with pytest.raises(PreemptedError) as stopped:
        body()
    assert (stopped.value.exit_code, stopped.value.step) == (143, 7)
    assert stopped.value.signal_name == "SIGTERM"


def test_guard_outside_main_thread_is_refused() -> None:
    caught: list[BaseException] = []

    def enter() -> None:
        try:
            with PreemptionGuard():
                pass
        except BaseException as error:
            caught.append(error)

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    assert isinstance(caught[0], InvalidArgumentError)


def test_save_final_checkpoint_drains_saves_and_raises(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 4)
    snapshot = Snapshot(str(tmp_path), {"model": model})
    with PreemptionGuard(signals=[signal.SIGTERM]) as guard:
        snapshot.save(5)
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(PreemptedError, match="SIGTERM") as caught:
            save_final_checkpoint(snapshot, 7, guard)
    assert caught.value.step == 7 and caught.value.exit_code == 143
    assert verify_checkpoint(str(tmp_path / "5")).ok and verify_checkpoint(str(tmp_path / "7")).ok


def run_loop(save_dir: Path, out_file: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(LOOP), str(save_dir), str(out_file)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_sigterm_final_checkpoint_and_bit_identical_resume(tmp_path: Path) -> None:
    interrupted_dir, reference_dir = tmp_path / "interrupted", tmp_path / "reference"
    process = subprocess.Popen(
        [sys.executable, str(LOOP), str(interrupted_dir), str(tmp_path / "resumed.pt")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "started 0"  # blocks until training runs
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    final = get_latest_valid_checkpoint(str(interrupted_dir), verify="full")
    assert final and out.strip() == f"preempted {step_from_checkpoint(final)}"
    assert step_from_checkpoint(final) < 2999  # it really was interrupted

    resumed = run_loop(interrupted_dir, tmp_path / "resumed.pt")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.startswith(f"started {step_from_checkpoint(final) + 1}")
    reference = run_loop(reference_dir, tmp_path / "reference.pt")
    assert reference.returncode == 0, reference.stderr

    got = torch.load(tmp_path / "resumed.pt")
    want = torch.load(tmp_path / "reference.pt")
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
