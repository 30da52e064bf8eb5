"""``tml train`` on several ranks and machines, TorchRec recipe: real torchrun, gloo, no mocks.

* a 2-rank run whose rank is SIGKILLed at a moment the run reports (a line of its log) is
  retried by Prefect and ends bit-identical to an uninterrupted 2-rank run, with no process left;
* the 2-rank checkpoint restores in one process, under another sharding plan, and is evaluated;
* a change of world size is refused unless allowed, then resumes 1 -> 2 ranks;
* two launchers on loopback act as two machines (``--nnodes 2``) over an S3 (moto) save_dir;
* the flow process of a 2-rank run never builds the model, and a checkpoint that does not fit
  it is refused by the ranks, with the named error, unretried, leaving run.json as it was.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from recipes.base import RecipeParams
from recipes.torchrec_ranking import TorchRecRankingSizes, build_recipe
from tml_checkpointing import (
    Snapshot,
    get_checkpoint,
    get_checkpoints,
    is_done_eval,
    read_checkpoint_metrics,
    verify_checkpoint,
)
from tml_checkpointing.format.layout import RUN_INFO, WRITER_LOCK

from .conftest import PrefectServer, S3Server, free_port
from .training_helpers import assert_bit_identical, checkpoint_tensors

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes.torchrec_ranking:build"
PARAMS: dict[str, Any] = {
    "epochs": 3, "steps_per_epoch": 6, "batch_size": 32, "seed": 5, "checkpoint_every_steps": 2,
}  # fmt: skip
RUN_TIMEOUT = 300
# Lines a rank logs while it is alive and busy: the moments a kill may land on.
MOMENT = re.compile(r"\[rank (\d)\] INFO \S+: (Saving step \d+|Restored \S+|epoch \d+: saving mid)")


def world_size_of(save_dir: str) -> int:
    """How many ranks wrote the newest checkpoint of ``save_dir`` (from its commit marker)."""
    snapshot = Snapshot.get_torch_snapshot(save_dir)
    assert snapshot is not None, f"no checkpoint in {save_dir}"
    return int(snapshot.metadata.world_size)


def tml_train(save_dir: str, *extra: str, **params: Any) -> list[str]:
    merged = {**PARAMS, **params}
    options = [f"--{k.replace('_', '-')}={v}" for k, v in merged.items()]
    return [
        sys.executable, "-m", "flows.cli", "train", "--save-dir", save_dir, "--recipe", RECIPE,
        *options, *extra, "--json",
    ]  # fmt: skip


def run(command: list[str], env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=REPO, timeout=RUN_TIMEOUT
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    summary: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return summary


def rank_processes() -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if "training.rank_epoch" in " ".join(process.info["cmdline"] or []):
            found.append(process)
    return found


def rank_process(rank: int) -> psutil.Process | None:
    for process in rank_processes():
        try:
            if process.environ().get("RANK") == str(rank):
                return process
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


@pytest.fixture(scope="module")
def env(prefect_server: PrefectServer) -> dict[str, str]:
    return {**prefect_server.env(), "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def two_rank_run(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """An uninterrupted 2-rank run: the reference every other run is compared with."""
    save_dir = str(tmp_path_factory.mktemp("ranks") / "reference")
    summary = run(tml_train(save_dir, "--nproc-per-node=2"), env)
    assert summary["final_step"] == 18 and summary["epochs_run"] == [0, 1, 2]
    return save_dir


def test_sigkill_of_one_rank_is_retried_and_ends_bit_identical(
    env: dict[str, str], two_rank_run: str, tmp_path: Path
) -> None:
    save_dir = str(tmp_path / "killed")
    chooser = random.Random(20261130)
    victim, moment = chooser.randint(0, 1), chooser.randint(2, 12)
    process = subprocess.Popen(
        tml_train(save_dir, "--nproc-per-node=2"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    assert process.stdout is not None
    lines: list[str] = []
    killed: tuple[int, str] | None = None  # (pid, the line it was killed at)
    seen = 0
    for line in process.stdout:
        lines.append(line)
        match = MOMENT.search(line)
        if killed is None and match and int(match.group(1)) == victim:
            seen += 1
            target = rank_process(victim) if seen >= moment else None
            if target is not None:
                try:
                    target.send_signal(signal.SIGKILL)
                    killed = (target.pid, line.strip())
                except psutil.NoSuchProcess:  # it finished meanwhile: the next moment then
                    pass
    process.wait(timeout=RUN_TIMEOUT)
    output = "".join(lines)
    assert killed is not None, f"no moment to kill at:\n{output[-4000:]}"
    pid, at = killed
    assert process.returncode == 0, output[-5000:]
    # Where the kill landed: torchrun saw exactly that rank process die of SIGKILL, and the
    # epoch failed once. Its retry (Prefect's) launched it again from the newest committed
    # checkpoint -- or, when the kill landed after the epoch's last checkpoint was committed
    # (a loaded machine delivers the line late), found that checkpoint and skipped the launch.
    assert re.search(rf"Signal 9 \(SIGKILL\) received by PID {pid}", output), output[-4000:]
    launched = re.findall(r"epoch (\d+): launching 2 rank", output)
    covered = re.findall(r"epoch (\d+): skipped, checkpoint at step (\d+) covers it", output)
    assert len(launched) + len(covered) == len(set(launched)) + 1, (at, launched, covered)
    for epoch, step in covered:  # a retry's skip: its epoch ran, and its end is committed
        end_of_epoch = (int(epoch) + 1) * PARAMS["steps_per_epoch"]
        assert epoch in launched and int(step) >= end_of_epoch, (at, covered)
    summary = json.loads(lines[-1])
    assert summary["final_step"] == 18 and summary["checkpoint"] == f"{save_dir}/18"
    # The ranks of a relaunched epoch record its attempt with its checkpoint (metrics.json).
    for epoch in {e for e in launched if launched.count(e) == 2}:
        end = f"{save_dir}/{(int(epoch) + 1) * PARAMS['steps_per_epoch']}"
        assert read_checkpoint_metrics(end)["train_attempt"] == 2.0, (at, launched)
    # Rank 0 writes an epoch's training metrics (metrics.json) once its last save committed.
    # A kill that landed after that commit (the "covered" case above) can come before the
    # write: that checkpoint then has no training loss (informational; its state is intact).
    covered_ends = {int(step) for _, step in covered}
    for step in range(PARAMS["steps_per_epoch"], 19, PARAMS["steps_per_epoch"]):
        metrics = read_checkpoint_metrics(f"{save_dir}/{step}")
        if step in covered_ends and "train_loss" not in metrics:
            continue
        assert metrics["train_loss"] > 0, (at, step, metrics)  # rank 0 wrote it
    assert_bit_identical(checkpoint_tensors(save_dir), checkpoint_tensors(two_rank_run))
    assert not rank_processes(), "rank processes left behind"


def full_tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A one-rank state as full tensors (a ShardedTensor on one rank has all its shards)."""
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}/{key}", item)
        elif hasattr(value, "local_shards"):
            (shard,) = value.local_shards()
            flat[prefix] = shard.tensor
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value

    for key, stateful in state.items():
        walk(key, stateful.state_dict())
    return flat


def test_two_rank_checkpoint_restores_in_one_process_with_another_plan(
    env: dict[str, str], two_rank_run: str
) -> None:
    checkpoint = get_checkpoint(two_rank_run)
    assert world_size_of(two_rank_run) == 2
    verify_checkpoint(checkpoint, level="full")  # the sidecar covers both ranks' files
    saved = checkpoint_tensors(two_rank_run)
    params = RecipeParams(seed=99, batch_size=PARAMS["batch_size"], lr=1e-3)  # other weights
    recipe = build_recipe(params, TorchRecRankingSizes(plan="table"))  # whole tables, 1 rank
    state = {"model": recipe.model, "optimizer": recipe.optimizer}
    Snapshot(two_rank_run, state).restore(checkpoint)
    restored = full_tensors(state)
    compared = [k for k in restored if f"0/{k}" in saved]
    assert any("t_user.weight" in k for k in compared)
    assert any("t_user.momentum1" in k for k in compared)
    assert any(k.startswith("optimizer/state/dense.") for k in compared)
    differing = [k for k in compared if not torch.equal(restored[k], saved[f"0/{k}"])]
    assert differing == []
    # One evaluator process evaluates the 2-rank run's final checkpoint.
    evaluate = [
        sys.executable, "-m", "flows.cli", "evaluate", "--save-dir", two_rank_run,
        "--partition", "val", "--eval-steps", "2", "--timeout", "60", "--poll-seconds", "0.5",
        "--json",
    ]  # fmt: skip
    result = run(evaluate, env)
    assert is_done_eval(checkpoint, "val"), result


def test_world_size_change_is_refused_then_resumes_from_one_to_two_ranks(
    env: dict[str, str], tmp_path: Path
) -> None:
    save_dir = str(tmp_path / "grow")
    run(tml_train(save_dir, epochs=1), env)  # one process
    refused = subprocess.run(
        tml_train(save_dir, "--nproc-per-node=2"), capture_output=True, text=True, env=env,
        cwd=REPO, timeout=RUN_TIMEOUT,
    )  # fmt: skip
    assert refused.returncode != 0 and "world_size: 1 recorded, 2 requested" in refused.stderr
    summary = run(tml_train(save_dir, "--nproc-per-node=2", "--allow-changed-config"), env)
    assert summary["epochs_skipped"] == [0] and summary["epochs_run"] == [1, 2]
    assert world_size_of(save_dir) == 2


def test_two_launchers_on_loopback_train_and_resume_over_s3(
    env: dict[str, str], s3_server: S3Server
) -> None:
    save_dir = f"s3://{s3_server.new_bucket()}/run"
    s3_env = {**os.environ, **env}  # the s3_server fixture put moto's AWS_* settings there

    def both_nodes(epochs: int) -> list[dict[str, Any]]:
        endpoint = f"127.0.0.1:{free_port()}"
        results: list[dict[str, Any]] = [{}, {}]

        def node(rank: int) -> None:
            command = tml_train(
                save_dir, "--nnodes=2", f"--node-rank={rank}", f"--rdzv-endpoint={endpoint}",
                epochs=epochs,
            )  # fmt: skip
            results[rank] = run(command, s3_env)

        threads = [threading.Thread(target=node, args=(rank,)) for rank in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert all(results), "a node failed (its output is in the assertion above)"
        return results

    first, _ = both_nodes(epochs=1)
    assert first["final_step"] == 6 and first["epochs_run"] == [0]
    assert world_size_of(save_dir) == 2
    resumed, other = both_nodes(epochs=2)
    assert resumed["resumed_from"] == f"{save_dir}/6"
    assert resumed["epochs_skipped"] == [0] and resumed["epochs_run"] == [1]
    assert other["final_step"] == 12
    verify_checkpoint(get_checkpoint(save_dir), level="full")


def test_sigterm_is_forwarded_and_the_ranks_checkpoint_the_step_together(
    env: dict[str, str], tmp_path: Path
) -> None:
    save_dir = str(tmp_path / "preempted")
    slow = {"batch_size": 4096, "epochs": 2}  # steps long enough for the signal to land in one
    process = subprocess.Popen(
        tml_train(save_dir, "--nproc-per-node=2", **slow),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    assert process.stdout is not None
    lines: list[str] = []
    for line in process.stdout:
        lines.append(line)
        if re.search(r"\[rank 0\] INFO \S+: Restored \S+/6 ", line):  # epoch 1 is starting
            process.send_signal(signal.SIGTERM)  # the launcher only, as a scheduler would
            break
    lines += process.stdout.readlines()
    process.wait(timeout=RUN_TIMEOUT)
    output = "".join(lines)
    assert process.returncode == 128 + signal.SIGTERM, output[-5000:]
    final = re.findall(
        r"\[rank 0\] WARNING \S+: Preempted by SIGTERM: final checkpoint at step (\d+)", output
    )
    assert final, output[-4000:]
    step = int(final[0])  # the step both ranks were at, saved together
    assert 6 < step < 12 and get_checkpoint(save_dir) == f"{save_dir}/{step}", output[-3000:]
    verify_checkpoint(get_checkpoint(save_dir), level="full")
    assert not rank_processes(), "rank processes left behind"
    summary = run(tml_train(save_dir, "--nproc-per-node=2", **slow), env)
    assert summary["resumed_from"] == f"{save_dir}/{step}" and summary["final_step"] == 12


def test_ranks_build_the_model_and_refuse_a_checkpoint_that_does_not_fit(
    env: dict[str, str], tmp_path: Path
) -> None:
    """The recipes of tests/helpers/rank_recipes.py raise when built outside a torchrun rank:
    a run of them that starts at all had its model built in the ranks only."""
    save_dir = tmp_path / "rank-only"
    recipes = "--recipe=tests.helpers.rank_recipes"
    first = run(tml_train(str(save_dir), "--nproc-per-node=2", f"{recipes}:build", epochs=1), env)
    assert first["final_step"] == 6
    record, checkpoints = (save_dir / RUN_INFO).read_bytes(), get_checkpoints(str(save_dir))
    refused = subprocess.run(
        tml_train(str(save_dir), "--nproc-per-node=2", f"{recipes}:wide_users",
                  "--allow-changed-config", epochs=2),
        capture_output=True, text=True, env=env, cwd=REPO, timeout=RUN_TIMEOUT,
    )  # fmt: skip
    output = refused.stdout + refused.stderr
    assert refused.returncode == 2, output[-5000:]
    error = json.loads(refused.stdout.strip().splitlines()[-1])
    # Global sizes compared, though each rank holds half the rows (row-wise plan).
    mismatch = "t_user.weight (saved shape [2000, 16], expected shape [4000, 16])"
    assert error["exit_code"] == 2 and mismatch in error["error"], error
    assert f"checkpoint {save_dir}/6 does not fit" in error["error"]
    assert "BuiltOutsideRanksError" not in output
    for rank in (0, 1):  # each rank checked its part and refused, before restoring
        assert re.search(
            rf"\[rank {rank}\] ERROR training\.rank_epoch: .*{re.escape(mismatch)}", output
        )
    # Named, and not retried: epoch 1 launched once, failed once.
    assert "attempt 1 failed: CheckpointShapeMismatchError" in output, output[-5000:]
    assert len(re.findall(r"epoch 1: launching 2 rank", output)) == 1
    assert "attempt 2" not in output
    # As a refusal in the flow process: run.json as it was, no lock, no new checkpoint.
    assert (save_dir / RUN_INFO).read_bytes() == record
    assert not (save_dir / WRITER_LOCK).exists()
    assert get_checkpoints(str(save_dir)) == checkpoints and checkpoints[-1].endswith("/6")
    assert not rank_processes(), "rank processes left behind"
