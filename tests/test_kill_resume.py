"""Kill ``tml train`` (the whole process group) at random moments; resume must be bit-identical."""

from __future__ import annotations

import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from tml_checkpointing import get_checkpoints
from training.config import TrainConfig

from .conftest import PrefectServer
from .training_helpers import assert_bit_identical, checkpoint_tensors, plain_run

PARAMS = {
    "epochs": 3,
    "steps_per_epoch": 10,
    "batch_size": 64,
    "seed": 11,
    "checkpoint_every_steps": 2,
}
SAVE_LINE = ("saving mid-epoch checkpoint", "-> ")  # logged right after a save starts


def tml_train(save_dir: str) -> list[str]:
    return [
        sys.executable, "-m", "flows.cli", "train", "--save-dir", save_dir,
        "--epochs", str(PARAMS["epochs"]), "--steps-per-epoch", str(PARAMS["steps_per_epoch"]),
        "--batch-size", str(PARAMS["batch_size"]), "--seed", str(PARAMS["seed"]),
        "--checkpoint-every-steps", str(PARAMS["checkpoint_every_steps"]), "--json",
    ]  # fmt: skip


def _pump(stream: object, lines: queue.Queue[str | None]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        lines.put(line)
    lines.put(None)


def run_and_kill(command: list[str], env: dict[str, str], moment: str, delay: float) -> bool:
    """Start ``command`` in its own process group and SIGKILL the group.

    ``moment`` is "startup" (``delay`` s after start), "save" (as soon as a save is
    logged) or "after-save" (``delay`` s after a save is logged). Returns False when the
    run finished by itself before the moment came.
    """
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True).start()
    deadline = time.monotonic() + (delay if moment == "startup" else 120)
    finished = False
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            finished = True
            break
        if moment != "startup" and any(marker in line for marker in SAVE_LINE):
            if moment == "after-save":
                time.sleep(delay)  # the point is a moment chosen at random after the save
            break
    if not finished:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    return not finished


def test_sigkill_at_random_moments_then_resume(
    prefect_server: PrefectServer, tmp_path: Path
) -> None:
    reference = TrainConfig(save_dir=str(tmp_path / "reference"), **PARAMS)
    plain_run(reference)
    save_dir = str(tmp_path / "killed")
    command = tml_train(save_dir)
    env = prefect_server.env()
    chooser = random.Random(20261129)
    moments = ["startup", "save", "after-save", "save", "after-save", "save", "after-save"]
    kills = 0
    for moment in moments:
        delay = chooser.uniform(0.5, 3.0) if moment == "startup" else chooser.uniform(0.0, 0.05)
        if run_and_kill(command, env, moment, delay):
            kills += 1
        survivors = [
            p
            for p in psutil.process_iter(["cmdline"])
            if save_dir in " ".join(p.info["cmdline"] or [])
        ]
        assert not survivors, f"processes left behind: {survivors}"
    assert kills >= 4  # a run that finishes before its moment is not a kill
    committed_before_final = len(get_checkpoints(save_dir))
    assert committed_before_final >= 1

    final = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert final.returncode == 0, final.stdout[-2000:] + final.stderr[-3000:]
    summary = json.loads(final.stdout.strip().splitlines()[-1])
    assert summary["final_step"] == 30
    assert summary["checkpoint"] == f"{save_dir}/30"
    assert {"epochs_run", "epochs_skipped"} <= summary.keys()
    assert_bit_identical(checkpoint_tensors(save_dir), checkpoint_tensors(reference.save_dir))


def test_sigterm_checkpoints_the_current_step_and_resume_is_bit_identical(
    prefect_server: PrefectServer, tmp_path: Path
) -> None:
    reference = TrainConfig(save_dir=str(tmp_path / "reference"), **PARAMS)
    plain_run(reference)
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
    assert_bit_identical(checkpoint_tensors(save_dir), checkpoint_tensors(reference.save_dir))
