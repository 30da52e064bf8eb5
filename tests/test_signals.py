"""SIGTERM / SIGINT to ``tml train``'s whole process group end the run cleanly in bounded time.

What a terminal (Ctrl-C), systemd, Kubernetes and a Prefect worker do: signal the group. Each
kill lands at a moment the process reports on its output (the private Prefect server started,
the flow started, a save logged), and each run must end with 128 + signum within
``DEADLINE_S``, print no traceback and leave no process behind (its private Prefect server
included); a run stopped mid-training has its step in progress committed, and running the
same command again finishes bit-identical to an uninterrupted run.

Runs without ``PREFECT_API_URL`` (the CLI starts its private server, ~5-10 s each) are few;
the others use the session's Prefect server. SIGTERM to the process mid-training with the
session's server, then a bit-identical resume: ``tests/test_kill_resume.py``.
"""

from __future__ import annotations

import os
import queue
import re
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from tml_checkpointing import get_checkpoints
from training.config import TrainConfig

from .conftest import PrefectServer
from .training_helpers import assert_bit_identical, checkpoint_tensors, plain_run

PARAMS: dict[str, Any] = {
    "epochs": 2,
    "steps_per_epoch": 6,
    "batch_size": 64,
    "seed": 5,
    "checkpoint_every_steps": 2,
}
DEADLINE_S = 15.0  # from the signal to the end of the process
SERVER_STARTED = "tml: started a private Prefect API server"
FLOW_STARTED = "Beginning flow run"
SAVE_LOGGED = "saving mid-epoch checkpoint"
MARK = "TML_SIGNAL_TEST"  # every process a run starts inherits it: how leftovers are found
REPO = Path(__file__).resolve().parents[1]


def tml_train(save_dir: str) -> list[str]:
    return [
        sys.executable, "-m", "flows.cli", "train", "--save-dir", save_dir,
        "--epochs", str(PARAMS["epochs"]), "--steps-per-epoch", str(PARAMS["steps_per_epoch"]),
        "--batch-size", str(PARAMS["batch_size"]), "--seed", str(PARAMS["seed"]),
        "--checkpoint-every-steps", str(PARAMS["checkpoint_every_steps"]), "--json",
    ]  # fmt: skip


def private_server_env(mark: str) -> dict[str, str]:
    """No PREFECT_API_URL: the CLI starts its own server (what a user gets by default)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return {**env, MARK: mark}


@dataclass
class Run:
    """A ``tml train`` in its own session (``setsid``), read line by line."""

    command: list[str]
    env: dict[str, str]
    process: subprocess.Popen[str] = field(init=False)
    lines: queue.Queue[str | None] = field(init=False, default_factory=queue.Queue)
    output: list[str] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=self.env, cwd=REPO, start_new_session=True,
        )  # fmt: skip
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, marker: str, timeout: float = 180) -> str:
        """Block until a line containing ``marker`` is printed (fails if the run ends first)."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            if line is None:
                pytest.fail(f"run ended before {marker!r}:\n{self.text()[-3000:]}")
            self.output.append(line)
            if marker in line:
                return line

    def signal_group_and_wait(self, sig: signal.Signals) -> float:
        """Signal the whole process group; seconds from the signal to the end of the process."""
        sent = time.monotonic()
        os.killpg(self.process.pid, sig)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            pytest.fail(f"still running 60 s after {sig.name}:\n{self.text()[-3000:]}")
        return time.monotonic() - sent

    def text(self) -> str:
        """Everything printed (call after the process ended to get all of it)."""
        if self.process.poll() is not None:
            while (line := self.lines.get(timeout=30)) is not None:
                self.output.append(line)
            self.lines.put(None)  # later calls see the end again
        return "".join(self.output)


def private_servers_of(process: subprocess.Popen[str]) -> list[psutil.Process]:
    return [
        child
        for child in psutil.Process(process.pid).children(recursive=True)
        if "local_server.py" in " ".join(child.cmdline())
    ]


def leftovers(mark: str, save_dir: str) -> list[str]:
    """Live processes started by a run: they carry its mark, or name its save_dir."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                continue  # dead, waiting to be reaped
            cmdline = " ".join(process.info["cmdline"] or [])
            if save_dir in cmdline or process.environ().get(MARK) == mark:
                found.append(f"{process.pid}: {cmdline}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def wait_until_gone(pid: int, timeout: float) -> bool:
    """Await the end of a process that is not our child (a pidfd turns readable at exit)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([pidfd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(pidfd)


def assert_clean_stop(
    run: Run, sig: signal.Signals, seconds: float, mark: str, save_dir: str
) -> None:
    text = run.text()
    assert run.process.returncode == 128 + sig, text[-3000:]
    assert seconds < DEADLINE_S, f"{seconds:.1f}s from {sig.name} to exit:\n{text[-3000:]}"
    assert "Traceback" not in text, text[-5000:]
    assert not leftovers(mark, save_dir), leftovers(mark, save_dir)


def stopped_step(text: str, sig: signal.Signals) -> int:
    match = re.search(
        rf"training stopped by {sig.name} at step (\d+); last checkpoint: step (\d+)", text
    )
    assert match, text[-3000:]
    assert match.group(1) == match.group(2), match.group(0)  # the step in progress, saved
    return int(match.group(1))


def test_sigterm_during_private_server_start_leaves_no_server(tmp_path: Path) -> None:
    """The orphaned-uvicorn case: the group is signalled while Prefect is still starting."""
    save_dir, mark = str(tmp_path / "run"), uuid.uuid4().hex
    run = Run(tml_train(save_dir), private_server_env(mark))
    run.wait_for(SERVER_STARTED)
    servers = private_servers_of(run.process)
    assert len(servers) == 1  # the kill lands while the private server is there
    seconds = run.signal_group_and_wait(signal.SIGTERM)
    assert_clean_stop(run, signal.SIGTERM, seconds, mark, save_dir)
    assert FLOW_STARTED not in run.text()  # it did land before the flow started
    assert "SIGTERM received: stopping (exit code 143)" in run.text()
    assert not servers[0].is_running()
    assert get_checkpoints(save_dir) == []


def test_sigkill_of_the_cli_takes_its_private_server_along(tmp_path: Path) -> None:
    save_dir, mark = str(tmp_path / "run"), uuid.uuid4().hex
    run = Run(tml_train(save_dir), private_server_env(mark))
    run.wait_for(SERVER_STARTED)
    (server,) = private_servers_of(run.process)
    run.process.kill()  # the CLI alone, no cleanup of any kind
    run.process.wait(timeout=30)
    assert wait_until_gone(server.pid, timeout=DEADLINE_S), server
    assert not leftovers(mark, save_dir), leftovers(mark, save_dir)


def test_ctrl_c_mid_training_with_private_server_then_resume(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the group) after a save: step checkpointed, exit 130, server gone."""
    reference = TrainConfig(save_dir=str(tmp_path / "reference"), **PARAMS)
    plain_run(reference)
    save_dir, mark = str(tmp_path / "run"), uuid.uuid4().hex
    run = Run(tml_train(save_dir), private_server_env(mark))
    saved = run.wait_for(SAVE_LOGGED)
    seconds = run.signal_group_and_wait(signal.SIGINT)
    assert_clean_stop(run, signal.SIGINT, seconds, mark, save_dir)
    step = stopped_step(run.text(), signal.SIGINT)
    assert step > int(re.findall(r"\d+", saved)[-1])  # stopped after the logged save
    assert step < PARAMS["epochs"] * PARAMS["steps_per_epoch"]  # really mid-run
    assert get_checkpoints(save_dir)[-1] == f"{save_dir}/{step}"

    again = subprocess.run(
        tml_train(save_dir), capture_output=True, text=True, env=private_server_env(mark),
        cwd=REPO, timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert not leftovers(mark, save_dir), leftovers(mark, save_dir)
    assert_bit_identical(checkpoint_tensors(save_dir), checkpoint_tensors(reference.save_dir))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_signal_at_flow_start_with_shared_server(
    prefect_server: PrefectServer, tmp_path: Path, sig: signal.Signals
) -> None:
    """Before training (Prefect's own SIGTERM handler is in charge then): prompt 128 + signum."""
    save_dir, mark = str(tmp_path / "run"), uuid.uuid4().hex
    run = Run(tml_train(save_dir), {**prefect_server.env(), MARK: mark})
    run.wait_for(FLOW_STARTED)
    seconds = run.signal_group_and_wait(sig)
    assert_clean_stop(run, sig, seconds, mark, save_dir)
    assert SAVE_LOGGED not in run.text()  # it did land before training
    assert "Finished in state Crashed" in run.text()  # reported to the server that stayed up


# --- the CLI's signal policy itself (flows.signals), in a bare process --------------------

TEARDOWN_SCRIPT = """
import atexit, sys, time
import flows.signals as signals
signals.EXIT_DEADLINE_S = float(sys.argv[1])
signals.exit_on_signals()
def teardown():
    print("tearing down", flush=True)
    time.sleep(60)  # a teardown that hangs (an API that stopped answering)
atexit.register(teardown)
print("ready", flush=True)
time.sleep(60)
"""


def _teardown_process(deadline_s: float) -> Run:
    return Run([sys.executable, "-c", TEARDOWN_SCRIPT, str(deadline_s)], dict(os.environ))


def test_hanging_teardown_is_cut_at_the_deadline() -> None:
    run = _teardown_process(deadline_s=1.0)
    run.wait_for("ready")
    seconds = run.signal_group_and_wait(signal.SIGTERM)
    assert run.process.returncode == 143
    assert 1.0 <= seconds < 5.0
    text = run.text()
    assert "tearing down" in text and "still shutting down after 1s" in text
    assert "Traceback" not in text


def test_second_signal_ends_teardown_at_once() -> None:
    run = _teardown_process(deadline_s=60.0)
    run.wait_for("ready")
    os.killpg(run.process.pid, signal.SIGINT)
    run.wait_for("tearing down")  # the first signal started the teardown
    seconds = run.signal_group_and_wait(signal.SIGINT)
    assert run.process.returncode == 130
    assert seconds < 5.0
    assert "second signal (SIGINT): exiting now" in run.text()


def test_a_signal_exit_wrapped_by_a_c_extension_still_ends_with_the_signal_code(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The handler's ``SignalExit`` raised inside pydantic's serialiser (a SIGTERM landing
    during ``import prefect``, seen on a loaded machine) reaches ``main`` as a
    ``PydanticSerializationError``: the run must still end with 128 + signum, no traceback."""
    import tml_checkpointing.cli
    from flows import cli, signals

    def interrupted_import(argv: list[str], extend: Any = None) -> int:
        signals._State.exit_code = 128 + signal.SIGTERM  # what the handler recorded
        raise RuntimeError("Error calling function `_ser_model`: SignalExit: 143")

    monkeypatch.setattr(tml_checkpointing.cli, "main", interrupted_import)
    monkeypatch.setattr(signals._State, "exit_code", None)
    with pytest.raises(SystemExit) as stop:
        cli.main(["checkpoints", "list", "/nonexistent"])
    assert stop.value.code == 128 + signal.SIGTERM
    assert stop.value.__cause__ is None and stop.value.__suppress_context__
