"""No process outlives its job: when ``tml train``'s process dies, everything below it ends.

A real 2-rank run (``tml train --nproc-per-node 2``: torchrun, gloo, the TorchRec recipe) is
started in a process group of its own, as a shell or a scheduler starts it. Once both ranks
report a checkpoint (a log line) and it is committed (its marker: the run prints no line for
that), so that no save is in flight, the test notes every process below the flow process --
``torchrun``, the ranks, each rank's writer process, the resource trackers -- and SIGKILLs
either the whole group (``kill -9 -- -PGID``) or the flow process alone. Then:

* every noted process is gone within :data:`PROMPT_S` (each one's time is printed);
* not one step directory appeared after the kill, the committed checkpoints are exactly those
  committed at the kill, and each verifies at level "full".

Quick ones, without torchrun, for what that run cannot show: a child whose parent died before
its death signal was armed ends at once, and the writer process, which watches its parent
process instead, survives the end of the thread that started it (``PR_SET_PDEATHSIG`` would
have killed it then).

Before ``training``/``tml_checkpointing.writing.parent_death``: after the group's SIGKILL the
ranks (in sessions of their own, out of the group's reach) trained on until their next log
line failed on the dead launcher's pipe, having begun the next checkpoint (step 40 here); after
the flow process's SIGKILL alone, ``torchrun`` got SIGTERM and passed it on, and the ranks
committed one more step, as for a preemption, for a run that no longer existed.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tml_checkpointing import verify_checkpoint
from tml_checkpointing.format.layout import COMMIT_MARKER
from tml_checkpointing.writing.writer_process import WriterProcess

from .conftest import PrefectServer
from .helpers.event_protocol import LineReader

REPO = Path(__file__).resolve().parents[1]
EVERY = 20  # steps between checkpoints: after one commits, the next save is far off
PARAMS = {
    "epochs": 1, "steps_per_epoch": 400, "batch_size": 32, "seed": 5,
    "checkpoint_every_steps": EVERY,
}  # fmt: skip
SAVING = re.compile(r"\[rank (\d)\] INFO \S+: Saving step (\d+) ")
LINE_TIMEOUT = 240  # the first line comes after torch + torchrec imports (slow under load)
COMMIT_TIMEOUT = 120
PROMPT_S = 10.0  # a bound, not a wait: the test goes on as soon as every process is gone
MARKER = "TML_ORPHANS_TEST"  # in the environment of every process of the test's job


def tml_train(save_dir: Path) -> list[str]:
    options = [f"--{k.replace('_', '-')}={v}" for k, v in PARAMS.items()]
    return [
        sys.executable, "-m", "flows.cli", "train", "--save-dir", str(save_dir),
        "--recipe", "recipes.torchrec_ranking:build", "--nproc-per-node=2", *options, "--json",
    ]  # fmt: skip


def alive(process: psutil.Process) -> bool:
    """Still running: neither gone nor a zombie (dead, waiting for its parent to reap it)."""
    try:
        return bool(process.is_running() and process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def role(process: psutil.Process) -> str:
    """What a process of the job is, from its command line."""
    try:
        command = " ".join(process.cmdline())
    except psutil.Error:
        return "?"
    for needle, name in (
        ("torch.distributed.run", "torchrun"),
        ("training.rank_epoch", "rank"),
        ("writer_main", "writer"),
        ("resource_tracker", "resource tracker"),
    ):
        if needle in command:
            return name
    return command[:80]


def steps_in(save_dir: Path) -> tuple[set[int], set[int]]:
    """(every step directory, the committed ones) in ``save_dir``."""
    steps = {int(entry.name) for entry in save_dir.iterdir() if entry.name.isdigit()}
    return steps, {step for step in steps if (save_dir / str(step) / COMMIT_MARKER).exists()}


def marked_processes(marker: str) -> list[psutil.Process]:
    """Every process whose environment carries this test's marker (wherever it was moved)."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.pid != os.getpid() and process.environ().get(MARKER) == marker:
                found.append(process)
    return found


@pytest.fixture
def job(
    prefect_server: PrefectServer, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[str], LineReader, Path]]:
    """``tml train`` on 2 ranks in a process group of its own; afterwards, fix or no fix,
    nothing it started is left running (each process killed by pid, psutil checking that it
    is still the same process)."""
    save_dir = tmp_path / "run"
    marker = uuid.uuid4().hex
    env = {**prefect_server.env(), "PYTHONPATH": str(REPO), MARKER: marker}
    process = subprocess.Popen(
        tml_train(save_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=env, cwd=REPO, start_new_session=True,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        yield process, LineReader(process.stdout), save_dir
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        left = marked_processes(marker)
        for survivor in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                survivor.kill()
        psutil.wait_procs(left, timeout=30)
        process.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["group", "flow process"])
def test_a_killed_run_leaves_no_process_and_commits_nothing_after(
    job: tuple[subprocess.Popen[str], LineReader, Path], kill: str
) -> None:
    process, lines, save_dir = job
    output: list[str] = []
    saving: dict[int, set[int]] = {}  # step -> the ranks that reported saving it
    while True:
        line = lines.next_line(LINE_TIMEOUT)
        assert line != LineReader.EOF, "the run ended before its ranks trained:\n" + "\n".join(
            output[-40:]
        )
        output.append(line)
        found = SAVING.search(line)
        if found:
            saving.setdefault(int(found.group(2)), set()).add(int(found.group(1)))
            if saving[int(found.group(2))] == {0, 1}:
                step = int(found.group(2))
                break
    deadline = time.monotonic() + COMMIT_TIMEOUT
    while not (save_dir / str(step) / COMMIT_MARKER).exists():  # no line says it: the file
        assert time.monotonic() < deadline, f"step {step} not committed in {COMMIT_TIMEOUT}s"
        time.sleep(0.02)

    family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    roles = {member.pid: role(member) for member in family}
    assert sorted(roles.values()).count("rank") == 2, roles
    assert sorted(roles.values()).count("writer") == 2, roles
    if kill == "group":
        os.killpg(process.pid, signal.SIGKILL)
    else:
        os.kill(process.pid, signal.SIGKILL)
    killed = time.monotonic()
    steps_at_kill, committed_at_kill = steps_in(save_dir)
    process.wait(timeout=PROMPT_S)  # ours to reap, or it stays a zombie

    gone: dict[int, float] = {}
    while len(gone) < len(family) and time.monotonic() - killed < PROMPT_S:
        for member in family:
            if member.pid not in gone and not alive(member):
                gone[member.pid] = time.monotonic() - killed
        time.sleep(0.02)  # polling: there is no event for another process's death
    print(f"\nafter SIGKILL of the {kill} (at step {step}):")
    for member in family:
        took = f"{gone[member.pid]:.2f} s" if member.pid in gone else "STILL RUNNING"
        print(f"  {roles[member.pid]} {member.pid}: {took}")
    survivors = [f"{roles[m.pid]} {m.pid}" for m in family if m.pid not in gone]
    assert not survivors, f"still running {PROMPT_S}s after the kill: {survivors}"

    steps, committed = steps_in(save_dir)
    assert steps == steps_at_kill, f"step directories begun after the kill: {steps - steps_at_kill}"
    assert committed == committed_at_kill, (
        f"committed after the kill: {committed - committed_at_kill}"
    )
    assert step in committed
    for done in sorted(committed):
        verify_checkpoint(str(save_dir / str(done)), level="full")


ARMED = (
    "import sys; from tml_checkpointing.writing.parent_death import die_with_parent;"
    " die_with_parent(grandparent=int(sys.argv[1])); print('alive')"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_rank_whose_torchrun_is_already_gone_ends_at_once() -> None:
    """As a rank checks its lineage: its parent's parent must be the launcher. Here the
    child's parent is this process; the child is told its grandparent is this process (as if
    it had been re-parented): it must end by SIGKILL before printing; told the truth, it lives."""
    wrong = subprocess.run(
        [sys.executable, "-c", ARMED, str(os.getpid())], capture_output=True, text=True, cwd=REPO
    )
    assert (wrong.returncode, wrong.stdout) == (-signal.SIGKILL, ""), wrong.stderr
    right = subprocess.run(
        [sys.executable, "-c", ARMED, str(os.getppid())], capture_output=True, text=True, cwd=REPO
    )
    assert (right.returncode, right.stdout) == (0, "alive\n"), right.stderr


def test_a_writer_whose_parent_is_already_gone_ends_at_once() -> None:
    """``--parent-pid`` names a process that is not its parent (as when the training process
    died before the writer started): the writer ends by SIGKILL without reading a command."""
    writer = subprocess.run(
        [sys.executable, "-P", "-m", "tml_checkpointing.writing.writer_main",
         "--parent-pid", str(os.getppid())],
        input='{"op": "ping"}\n', capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert (writer.returncode, writer.stdout) == (-signal.SIGKILL, ""), writer.stderr


def test_the_writer_outlives_the_thread_that_started_it() -> None:
    """Any thread may start the writer (a relay thread that ends after one save, a Prefect
    task's): it must serve this process, not that thread."""
    writer = WriterProcess()
    starter = threading.Thread(target=writer.start, name="short-lived")
    starter.start()
    starter.join()
    try:
        first = writer.ping()
        time.sleep(0.5)  # several of the writer's parent checks; a thread-tied signal is instant
        assert writer.ping()["pid"] == first["pid"]
    finally:
        writer.close()
