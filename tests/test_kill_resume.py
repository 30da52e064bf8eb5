"""Kill ``tml train`` (the whole process group) at moments it reports; resume is bit-identical.

Each killed run goes through tests/helpers/run_with_events.py: the CLI in one process that
reports every library event on a pipe and pauses at the chosen one (e.g. "data written,
marker pending", "mid-epoch save committed"). The test SIGKILLs the process group while it is
paused there, proves from the files where the kill landed, and goes on. No moment comes from
a clock, so a loaded machine changes the runtime only. Finally the plain command resumes and
must end with tensors bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from tml_checkpointing import (
    DELETE_DONE,
    DELETE_STARTED,
    DELETE_UNCOMMITTED,
    SAVE_COMMITTED,
    SAVE_DATA_WRITTEN,
    SAVE_SIDECAR_WRITTEN,
    SAVE_STARTED,
    find_incomplete,
    get_checkpoint,
    get_checkpoints,
    get_latest_valid_checkpoint,
    step_from_checkpoint,
    verify_checkpoint,
)
from tml_checkpointing.format.layout import INTEGRITY_SIDECAR, is_data_file
from tml_checkpointing.reading.chains import read_chain_link
from training.config import TrainConfig

from .conftest import PrefectServer
from .helpers.event_protocol import DirModel, LineReader
from .training_helpers import assert_bit_identical, checkpoint_tensors, plain_run

PARAMS: dict[str, Any] = {
    "epochs": 3,
    "steps_per_epoch": 10,
    "batch_size": 64,
    "seed": 11,
    "checkpoint_every_steps": 2,
    "keep_last": 2,
}
WRAPPER = "tests.helpers.run_with_events"  # run as a module from the repository root
REPO = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("TML_CRASH_SEED", "20261129"))
PAUSE_TIMEOUT_S = 240  # a cold run on a loaded 2-core machine: imports, Prefect, training

# Saves at steps 2, 4, ..., 30 (every 10th ends an epoch and is followed by a prune that
# keeps the last 2). Each kill's run resumes where the previous one left off:
PLANNED = [
    (SAVE_DATA_WRITTEN, 2),  # 2 committed; 4's data written, marker pending
    (SAVE_COMMITTED, 2),  # 4, then mid-epoch 6 committed; training waits to save 8
    (SAVE_COMMITTED, 2),  # 8, then epoch-end 10 committed; prune pending: 2..10 all there
    (DELETE_UNCOMMITTED, 1),  # 12..20 committed, prune: 2's marker deleted, data not yet
]
MOMENTS = (
    SAVE_STARTED,
    SAVE_DATA_WRITTEN,
    SAVE_SIDECAR_WRITTEN,
    SAVE_COMMITTED,
    DELETE_STARTED,
    DELETE_UNCOMMITTED,
    DELETE_DONE,
)


# Incremental saves of the recipe: the user table (64,000 bytes) and its Adam moments are
# chained; dense layers, which change in every row at every step, are not (were they, their
# deltas would exceed the chain budget and every save would be full). Under Adam, a row no id
# has touched yet stays unchanged, so saves within a chain are deltas of a fraction of rows.
INCREMENTAL = ["--incremental", "--full-every", "3", "--incremental-min-bytes", "40000"]


def tml_args(save_dir: str, extra: list[str] | None = None) -> list[str]:
    return [
        "train", "--save-dir", save_dir, *(extra or []),
        "--epochs", str(PARAMS["epochs"]), "--steps-per-epoch", str(PARAMS["steps_per_epoch"]),
        "--batch-size", str(PARAMS["batch_size"]), "--seed", str(PARAMS["seed"]),
        "--checkpoint-every-steps", str(PARAMS["checkpoint_every_steps"]),
        "--keep-last", str(PARAMS["keep_last"]), "--json",
    ]  # fmt: skip


def tml_train(save_dir: str, extra: list[str] | None = None) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *tml_args(save_dir, extra)]


@dataclass
class Kill:
    event: str
    path: str
    events: list[tuple[str, str]]  # (name, path) reported by the run, the pause last


def run_and_kill(
    save_dir: str,
    env: dict[str, str],
    pause: str,
    occurrence: int,
    log: Path,
    extra: list[str] | None = None,
) -> Kill:
    """Run ``tml train`` paused at the ``occurrence``-th ``pause`` event; SIGKILL its group."""
    read_end, write_end = os.pipe()
    command = [
        sys.executable, "-m", WRAPPER, "--events-fd", str(write_end),
        "--pause", f"{pause}:{occurrence}", *tml_args(save_dir, extra),
    ]  # fmt: skip
    with log.open("a") as output:
        process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=REPO,
            pass_fds=(write_end,), start_new_session=True,
        )  # fmt: skip
    os.close(write_end)
    events: list[tuple[str, str]] = []
    try:
        lines = LineReader(os.fdopen(read_end))
        while True:
            line = lines.next_line(PAUSE_TIMEOUT_S)
            kind, _, rest = line.partition(" ")
            name, _, path = rest.partition(" ")
            if kind == "event":
                events.append((name, path))
            elif kind == "paused":
                assert (name, path) == events[-1] and name == pause, line
                break
            else:
                raise AssertionError(
                    f"run ended before pausing at {pause}:{occurrence}:\n{log.read_text()[-3000:]}"
                )
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert sum(1 for name, _ in events if name == pause) == occurrence
    return Kill(event=pause, path=path, events=events)


def prove_landing(save_dir: str, kill: Kill, model: DirModel) -> None:
    """The files say the kill landed where the run said it paused."""
    for name, path in kill.events:
        model.apply(name, step_from_checkpoint(path))
    where = f"killed at {kill.event} {kill.path}"
    committed = {step_from_checkpoint(p) for p in get_checkpoints(save_dir)}
    assert committed == model.committed, where
    incomplete = {entry.step for entry in find_incomplete(save_dir, 0)}
    assert incomplete == model.incomplete, where
    step = step_from_checkpoint(kill.path)
    newest = max(committed, default=None)
    if kill.event == SAVE_STARTED:
        assert step not in committed and (newest is None or newest < step), where
    elif kill.event in (SAVE_DATA_WRITTEN, SAVE_SIDECAR_WRITTEN):  # marker pending
        assert step in incomplete and (newest is None or newest < step), where
    elif kill.event == SAVE_COMMITTED:  # committed, the next save or the prune pending
        assert step == newest, where
    elif kill.event == DELETE_STARTED:
        assert step in committed, where
    elif kill.event == DELETE_UNCOMMITTED:
        assert step in incomplete and step not in committed, where
        files = [str(f.relative_to(kill.path)) for f in Path(kill.path).rglob("*") if f.is_file()]
        assert INTEGRITY_SIDECAR in files and any(map(is_data_file, files)), f"{where}: {files}"
    elif kill.event == DELETE_DONE:
        assert step not in committed | incomplete, where
    latest = get_latest_valid_checkpoint(save_dir, verify="full")
    if newest is None:
        assert not latest, where
        return
    assert latest == get_checkpoint(save_dir) == f"{save_dir}/{newest}", where
    for checkpoint in get_checkpoints(save_dir):
        assert verify_checkpoint(checkpoint, level="full").status == "valid", checkpoint


def assert_no_survivors(save_dir: str) -> None:
    survivors = [
        p for p in psutil.process_iter(["cmdline"]) if save_dir in " ".join(p.info["cmdline"] or [])
    ]
    assert not survivors, f"processes left behind: {survivors}"


@pytest.fixture(scope="module")
def reference_steps(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, torch.Tensor]]:
    """Every checkpoint's tensors of an uninterrupted run (plain functions, no Prefect), by
    step: retention only deletes, so the run keeps them all and trains the same."""
    params = {**PARAMS, "keep_last": None}
    config = TrainConfig(save_dir=str(tmp_path_factory.mktemp("reference")), **params)
    plain_run(config)
    steps = [step_from_checkpoint(path) for path in get_checkpoints(config.save_dir)]
    assert steps == list(range(2, 31, 2))
    return {step: checkpoint_tensors(config.save_dir, step) for step in steps}


@pytest.fixture(scope="module")
def reference(reference_steps: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The final checkpoint's tensors of an uninterrupted run."""
    return reference_steps[30]


def assert_checkpoints_match(
    save_dir: str, reference_steps: dict[int, dict[str, torch.Tensor]], where: str
) -> None:
    """Every committed checkpoint holds exactly what the uninterrupted run had at its step."""
    for checkpoint in get_checkpoints(save_dir):
        step = step_from_checkpoint(checkpoint)
        try:
            assert_bit_identical(checkpoint_tensors(save_dir, step), reference_steps[step])
        except AssertionError as error:
            raise AssertionError(f"{where}: checkpoint {step}: {error}") from None


@pytest.mark.parametrize("extra", [[], INCREMENTAL], ids=["full", "incremental"])
def test_sigkill_at_reported_moments_then_resume(
    prefect_server: PrefectServer,
    reference_steps: dict[int, dict[str, torch.Tensor]],
    tmp_path: Path,
    extra: list[str],
) -> None:
    """Also with incremental saves: the same moments land in deltas and in prunes that keep
    chain bases, and every checkpoint, delta or full, holds exactly the uninterrupted run's
    state (compared against a run without incremental saves: they must not change a bit)."""
    save_dir = str(tmp_path / "killed")
    env = {**prefect_server.env(), "PYTHONPATH": str(REPO)}
    chooser = random.Random(SEED)
    # The last run starts from step 20: every moment comes at least twice in its epoch.
    moments = [*PLANNED, (chooser.choice(MOMENTS), chooser.randint(1, 2))]
    model = DirModel()
    log = tmp_path / "runs.log"
    deltas: set[int] = set()  # committed delta checkpoints seen between kills
    for pause, occurrence in moments:
        kill = run_and_kill(save_dir, env, pause, occurrence, log, extra)
        assert_no_survivors(save_dir)
        prove_landing(save_dir, kill, model)
        assert_checkpoints_match(
            save_dir, reference_steps, f"after the kill at {kill.event} {kill.path}"
        )
        for checkpoint in get_checkpoints(save_dir):
            link = read_chain_link(checkpoint)
            if link is not None and link.is_delta:
                deltas.add(step_from_checkpoint(checkpoint))
        if kill.path == f"{save_dir}/10" and pause == SAVE_COMMITTED:
            assert model.committed == {2, 4, 6, 8, 10}, "the prune ran before the kill"
    assert bool(deltas) == bool(extra), f"delta checkpoints seen: {sorted(deltas)}"

    # The final run keeps every checkpoint it writes (milestones every 2 steps; retention is
    # not part of a run's identity), so that each of its steps is compared too.
    keep_all = ["--keep-every-steps", str(PARAMS["checkpoint_every_steps"])]
    final = subprocess.run(
        tml_train(save_dir, [*extra, *keep_all]),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert final.returncode == 0, final.stdout[-2000:] + final.stderr[-3000:]
    summary = json.loads(final.stdout.strip().splitlines()[-1])
    assert summary["final_step"] == 30
    assert summary["checkpoint"] == f"{save_dir}/30"
    assert {"epochs_run", "epochs_skipped"} <= summary.keys()
    try:
        assert_checkpoints_match(save_dir, reference_steps, "after the final run")
    except AssertionError as error:  # keep what explains a failure in the report
        story = "\n".join(line for line in log.read_text().splitlines() if "obj_out" not in line)
        raise AssertionError(
            f"{error}\nsteps on disk: {sorted(os.listdir(save_dir))}\n"
            f"--- killed runs (tail) ---\n{story[-6000:]}\n"
            f"--- final run (tail) ---\n{final.stdout[-3000:]}\n{final.stderr[-3000:]}"
        ) from None


def test_sigterm_checkpoints_the_current_step_and_resume_is_bit_identical(
    prefect_server: PrefectServer, reference: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    save_dir = str(tmp_path / "preempted")
    command = tml_train(save_dir)
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=prefect_server.env(), start_new_session=True,
    )  # fmt: skip
    assert process.stdout is not None
    output = []
    for line in process.stdout:  # training is under way once the first save is logged
        output.append(line)
        if "saving mid-epoch checkpoint" in line:
            process.send_signal(signal.SIGTERM)
            break
    output.extend(process.stdout)
    assert process.wait(timeout=120) == 143, "".join(output)[-3000:]
    match = re.search(r"training stopped by SIGTERM at step (\d+); last checkpoint: step (\d+)",
                      "".join(output))  # fmt: skip
    assert match, "".join(output)[-3000:]
    stopped_at = int(match.group(1))
    assert stopped_at > 2 and int(match.group(2)) == stopped_at  # the step in progress, saved
    assert get_checkpoints(save_dir)[-1] == f"{save_dir}/{stopped_at}"
    final = subprocess.run(command, capture_output=True, text=True, env=prefect_server.env())
    assert final.returncode == 0, final.stderr[-3000:]
    assert_bit_identical(checkpoint_tensors(save_dir), reference)
