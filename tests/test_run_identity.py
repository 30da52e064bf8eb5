"""A run's identity is fixed at its first start: run.json, refused resumes, segments, bad input.

Issue 8, point 6 and parts of 7. The CLI runs in this process (``flows.cli.main``) against the
session's Prefect server (``prefect_api``, so no private server starts), so exit codes are the
real ones without paying a process start per case; the disk-full case runs ``tml train`` as a
real process on a real, tiny tmpfs.
"""

from __future__ import annotations

import errno
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from prefect.client.orchestration import get_client
from prefect.client.schemas.sorting import FlowRunSort
from prefect.states import Failed

from flows.cli import main
from flows.train import train
from recipes.base import RecipeParams, load_recipe
from recipes.torchrec_ranking import SparseFeature, TorchRecRankingSizes, build_recipe
from tasks.training import _retryable
from tml_checkpointing import (
    CheckpointWriteError,
    SaveDirLockedError,
    Snapshot,
    get_checkpoints,
)
from tml_checkpointing.errors import CheckpointShapeMismatchError
from tml_checkpointing.format.layout import RUN_INFO, WRITER_LOCK
from tml_checkpointing.reading.shapes import check_checkpoint_fits
from training.config import TrainConfig
from training.evaluation import EvalConfig, RunNotFoundError, await_run, evaluate_checkpoint
from training.failures import retry_cannot_help
from training.loop import InjectedFailure
from training.run_info import (
    RunConfigChangedError,
    RunInfo,
    RunSegment,
    read_run_info,
    reconcile_run_info,
)

from .conftest import PrefectServer
from .training_helpers import plain_run

NARROW = "tests.helpers.recipes:narrow"
SHIFTED = "tests.helpers.recipes:narrow_shifted"
WIDE = "tests.helpers.recipes:wide"
FAST = ["--batch-size", "16", "--recipe", NARROW]


def tree(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``root``: size, mtime and content hash (``{}`` if it does not exist)."""
    if not root.exists():
        return {}
    return {
        str(path.relative_to(root)): (
            path.stat().st_size,
            path.stat().st_mtime_ns,
            hashlib.sha256(path.read_bytes()).hexdigest(),
        )
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def tml(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    """``tml ... --json`` in this process: exit code and the last JSON line of stdout."""
    capsys.readouterr()
    try:
        code = main([*argv, "--json"])
    except SystemExit as exit_:  # argparse refuses before any handler runs
        code = int(exit_.code or 0)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    return code, json.loads(lines[-1]) if lines else {}


def config(save_dir: Path, **fields: Any) -> TrainConfig:
    return TrainConfig(save_dir=str(save_dir), batch_size=16, recipe=NARROW, **fields)


# -- the record itself (pure) ----------------------------------------------------------------


def test_reconcile_decides_what_run_json_records(tmp_path: Path) -> None:
    first = config(tmp_path, epochs=2, steps_per_epoch=5)
    stored = reconcile_run_info(None, first, 0)
    assert stored is not None and stored.final_step == 10
    assert [s.from_step for s in stored.segments] == [1]
    assert reconcile_run_info(stored, first, 10) is None  # same run: nothing to write

    grown = reconcile_run_info(stored, config(tmp_path, epochs=3, steps_per_epoch=5), 10)
    assert grown is not None and (grown.epochs, grown.final_step) == (3, 15)
    assert grown.segments == stored.segments

    changed = config(tmp_path, epochs=3, steps_per_epoch=7, lr=0.5, seed=42)
    with pytest.raises(RunConfigChangedError) as refused:
        reconcile_run_info(stored, changed, 10)
    assert refused.value.changes == {
        "seed": (0, 42),
        "steps_per_epoch": (5, 7),
        "lr": (0.001, 0.5),
    }
    assert "lr: 0.001 recorded, 0.5 requested" in str(refused.value)
    with pytest.raises(RunConfigChangedError, match="epochs: 2 recorded, 1 requested"):
        reconcile_run_info(stored, config(tmp_path, epochs=1, steps_per_epoch=5), 10)

    allowed = reconcile_run_info(stored, changed, 10, allow_changed_config=True)
    assert allowed is not None and allowed.final_step == 21
    assert allowed.segments[0] == stored.segments[0]  # history kept
    assert (allowed.current.from_step, allowed.current.changed) == (
        11,
        ["seed", "steps_per_epoch", "lr"],
    )

    warm = config(tmp_path, epochs=2, steps_per_epoch=5, initial_checkpoint="/elsewhere/5")
    with pytest.raises(RunConfigChangedError, match="initial_checkpoint"):
        reconcile_run_info(stored, warm, 0)  # the warm start is still to happen
    assert reconcile_run_info(stored, warm, 5) is None  # resumed: it no longer matters


def test_segment_for_picks_the_parameters_that_produced_a_step() -> None:
    def segment(from_step: int, lr: float) -> RunSegment:
        return RunSegment(
            from_step=from_step, recipe=NARROW, seed=0, batch_size=16, steps_per_epoch=4, lr=lr
        )

    # lr 0.1 from step 9, then checkpoints >= 9 were lost and the run resumed from 6 with 0.2
    info = RunInfo(epochs=4, final_step=16, segments=[segment(1, 0.0), segment(9, 0.1),
                                                       segment(7, 0.2)])  # fmt: skip
    assert [info.segment_for(step).lr for step in (4, 6, 7, 8, 12)] == [0, 0, 0.2, 0.2, 0.2]
    flat = RunInfo.model_validate(
        {"recipe": NARROW, "seed": 1, "batch_size": 8, "lr": 0.1, "epochs": 2,
         "steps_per_epoch": 3, "final_step": 6, "initial_checkpoint": None}
    )  # fmt: skip
    assert flat.final_step == 6 and flat.segment_for(6).seed == 1  # the first format still reads


# -- shapes and retries ----------------------------------------------------------------------


def test_shape_mismatch_is_named_before_anything_is_restored(tmp_path: Path) -> None:
    plain_run(TrainConfig(save_dir=str(tmp_path), epochs=1, steps_per_epoch=2, recipe=WIDE))
    recipe = load_recipe(NARROW)(TrainConfig(save_dir="x", epochs=1).recipe_params())
    before = {k: v.clone() for k, v in recipe.model.state_dict().items()}
    snapshot = Snapshot(str(tmp_path), {"model": recipe.model, "optimizer": recipe.optimizer})
    with pytest.raises(CheckpointShapeMismatchError) as mismatch:
        snapshot.restore(f"{tmp_path}/2")
    assert "model/hidden.weight (saved shape [16, 16], expected shape [8, 16])" in str(
        mismatch.value
    )
    assert all(torch.equal(before[k], v) for k, v in recipe.model.state_dict().items())
    assert retry_cannot_help(mismatch.value)
    assert not _retryable(Failed(data=mismatch.value))


def test_a_sharded_table_that_is_not_the_models_size_does_not_fit(tmp_path: Path) -> None:
    """TorchRec tables are ``ShardedTensor``s, compared by global size (what a rank of a run
    with several checks its part against before restoring; in one process, the flow)."""
    params = RecipeParams(seed=0, batch_size=16, lr=1e-3)
    saved = build_recipe(params)  # tables of 2000 users, in this process's one-rank group
    state = {"model": saved.model, "optimizer": saved.optimizer}
    snapshot = Snapshot(str(tmp_path), state)
    try:
        snapshot.save(1).wait()
    finally:
        snapshot.close()
    check_checkpoint_fits(f"{tmp_path}/1", state)  # the model that wrote it fits
    default = TorchRecRankingSizes()
    taller = TorchRecRankingSizes(
        features=tuple(
            SparseFeature(f.name, 4000, f.max_ids) if f.name == "user" else f
            for f in default.features
        )
    )
    other = build_recipe(params, taller)
    with pytest.raises(CheckpointShapeMismatchError) as mismatch:
        check_checkpoint_fits(f"{tmp_path}/1", {"model": other.model, "optimizer": other.optimizer})
    message = str(mismatch.value)
    assert "t_user.weight (saved shape [2000, 16], expected shape [4000, 16]) (and 1 more)" in (
        message
    )  # the other: the table's row-wise Adagrad state, [2000] saved


def test_retry_condition_walks_the_cause_chain() -> None:
    def raised(error: BaseException, cause: BaseException) -> BaseException:
        try:
            raise error from cause
        except BaseException as caught:
            return caught

    full = raised(CheckpointWriteError("saving step 4 failed"), OSError(errno.ENOSPC, "full"))
    quota = raised(CheckpointWriteError("x"), OSError(errno.EDQUOT, "quota"))
    reset = raised(CheckpointWriteError("x"), ConnectionResetError(errno.ECONNRESET, "reset"))
    for permanent in (full, quota, SaveDirLockedError("held"), RunConfigChangedError("x", {})):
        assert not _retryable(Failed(data=permanent)), permanent
    for transient in (reset, InjectedFailure("step 3"), RuntimeError("flaky")):
        assert _retryable(Failed(data=transient)), transient


# -- resumes through the CLI -----------------------------------------------------------------


def test_resume_with_other_parameters_is_refused_and_changes_nothing(
    prefect_api: PrefectServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's case: epochs cut differently, lr and seed changed, then another recipe."""
    save_dir = str(tmp_path / "run")
    base = ["train", "--save-dir", save_dir, "--epochs", "2", "--steps-per-epoch", "5"]
    assert tml(capsys, *base, *FAST)[0] == 0
    before = tree(tmp_path)
    code, error = tml(
        capsys, "train", "--save-dir", save_dir, "--epochs", "3", "--steps-per-epoch", "7",
        "--lr", "0.5", "--seed", "42", *FAST,
    )  # fmt: skip
    assert code == 2
    for named in ("seed: 0 recorded, 42", "steps_per_epoch: 5 recorded, 7", "lr: 0.001 recorded"):
        assert named in error["error"]
    assert tree(tmp_path) == before  # not even run.json or a lock

    code, error = tml(capsys, *base, "--batch-size", "16", "--recipe", WIDE)
    assert code == 2 and f"recipe: '{NARROW}' recorded, '{WIDE}' requested" in error["error"]
    code, error = tml(
        capsys, *base, "--batch-size", "16", "--recipe", WIDE, "--allow-changed-config"
    )
    assert code == 2  # allowed, but the checkpoint cannot restore into the wide model
    assert "model/hidden.weight (saved shape [8, 16], expected shape [16, 16])" in error["error"]
    assert tree(tmp_path) == before
    assert tml(capsys, *base, *FAST)[0] == 0  # the recorded values still resume
    assert tree(tmp_path) == before  # ... and a finished run's rerun rewrites nothing


def test_epochs_may_grow(
    prefect_api: PrefectServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_dir = str(tmp_path / "run")
    base = ["train", "--save-dir", save_dir, "--steps-per-epoch", "3", *FAST]
    assert tml(capsys, *base, "--epochs", "1")[0] == 0
    code, result = tml(capsys, *base, "--epochs", "2")
    assert code == 0 and (result["final_step"], result["epochs_run"]) == (6, [1])
    info = read_run_info(save_dir)
    assert (info.epochs, info.final_step, len(info.segments)) == (2, 6, 1)


def test_allowed_change_is_a_segment_that_optimizer_and_evaluator_follow(
    prefect_api: PrefectServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_dir = str(tmp_path / "run")
    base = ["train", "--save-dir", save_dir, "--steps-per-epoch", "4", "--batch-size", "16"]
    assert tml(capsys, *base, "--epochs", "1", "--recipe", NARROW)[0] == 0
    changed = [*base, "--epochs", "2", "--recipe", SHIFTED, "--lr", "0.01"]
    assert tml(capsys, *changed, "--allow-changed-config")[0] == 0
    info = read_run_info(save_dir)
    assert [(s.from_step, s.recipe, s.lr, s.changed) for s in info.segments] == [
        (1, NARROW, 0.001, []),
        (5, SHIFTED, 0.01, ["recipe", "lr"]),
    ]
    assert info.final_step == 8
    # The restored optimizer trained on with the new lr, not the one saved at step 4.
    saved = Snapshot.get_torch_snapshot(save_dir, global_step=8)
    assert saved is not None and saved.read_object("0/optimizer/param_groups/0/lr") == 0.01

    def metrics_with(recipe_path: str, step: int, segment: RunSegment) -> dict[str, float]:
        recipe = load_recipe(recipe_path)(segment.recipe_params())
        Snapshot(save_dir, {"model": recipe.model}).restore(f"{save_dir}/{step}", keys=["model"])
        return recipe.evaluate(recipe.model, recipe.eval_batches("validation", 2))

    eval_config = EvalConfig(save_dir=save_dir, partition="validation", eval_steps=2)
    for step, recipe_path, other in ((4, NARROW, SHIFTED), (8, SHIFTED, NARROW)):
        segment = info.segment_for(step)
        result = evaluate_checkpoint(eval_config, f"{save_dir}/{step}")
        assert result.metrics == metrics_with(recipe_path, step, segment)
        assert result.metrics != metrics_with(other, step, segment)  # the data tells them apart

    before = tree(tmp_path)
    assert tml(capsys, *changed)[0] == 0  # the current values resume without the flag
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    "extra",
    [
        ["--lr", "nan"],
        ["--lr", "inf"],
        ["--lr", "0"],
        ["--lr", "-0.1"],
        ["--recipe", "nosuch:build"],
        ["--recipe", "recipes.ranking:nosuch"],
        ["--initial-checkpoint", "{tmp}/missing/5"],
    ],
)
def test_bad_input_exits_2_and_writes_nothing(
    prefect_api: PrefectServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str]
) -> None:
    save_dir = tmp_path / "run"
    argv = ["train", "--save-dir", str(save_dir), "--epochs", "1"]
    argv += [part.replace("{tmp}", str(tmp_path)) for part in extra]
    started = time.monotonic()
    code, error = tml(capsys, *argv)
    assert code == 2, error
    assert time.monotonic() - started < 30  # before Prefect starts
    assert error["error"]
    assert not save_dir.exists()


def test_a_checkpoint_as_save_dir_is_refused(
    prefect_api: PrefectServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain_run(config(tmp_path / "run", epochs=1, steps_per_epoch=2))
    before = tree(tmp_path)
    for inside in ("run/2", "run/2/0"):
        code, error = tml(capsys, "train", "--save-dir", str(tmp_path / inside), "--epochs", "1")
        assert code == 2 and "not a save_dir" in error["error"], error
    assert tree(tmp_path) == before


def test_flow_refuses_a_changed_config_before_taking_the_lock(
    prefect_api: PrefectServer, tmp_path: Path
) -> None:
    """Deployments call the flow directly (no CLI pre-check): it refuses before any write."""
    save_dir = tmp_path / "run"
    plain_run(config(save_dir, epochs=1, steps_per_epoch=2))
    (save_dir / RUN_INFO).write_text(
        RunInfo.of(config(save_dir, epochs=1, steps_per_epoch=2)).model_dump_json()
    )
    before = tree(tmp_path)
    state = train(
        TrainConfig(save_dir=str(save_dir), epochs=1, steps_per_epoch=2, batch_size=16,
                    recipe=NARROW, seed=9),
        return_state=True,
    )  # fmt: skip
    assert state.is_failed()
    with pytest.raises(RunConfigChangedError, match="seed: 0 recorded, 9 requested"):
        state.result()
    assert tree(tmp_path) == before and not (save_dir / WRITER_LOCK).exists()


# -- a full disk -----------------------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 160 KiB tmpfs: the run's first checkpoint (~230 KB) does not fit on it."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_disk_full_exits_3_and_is_not_retried(prefect_api: PrefectServer, tiny_disk: Path) -> None:
    save_dir = str(tiny_disk / "run")
    process = subprocess.run(
        [sys.executable, "-m", "flows.cli", "train", "--save-dir", save_dir, "--epochs", "1",
         "--steps-per-epoch", "2", "--batch-size", "16", "--json"],
        capture_output=True, text=True, env=prefect_api.env(), timeout=180,
    )  # fmt: skip
    assert process.returncode == 3, process.stderr[-3000:]
    error = json.loads(process.stdout.strip().splitlines()[-1])
    assert error["exit_code"] == 3 and "No space left on device" in error["error"], error
    assert "storage error" in error["error"]
    assert get_checkpoints(save_dir) == []  # nothing committed
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=50)
        flow_run = next(
            run for run in runs if run.parameters.get("config", {}).get("save_dir") == save_dir
        )
        tasks = client.read_task_runs()
    epoch = [t for t in tasks if t.flow_run_id == flow_run.id and t.name.startswith("epoch 0 · ")]
    assert len(epoch) == 1 and epoch[0].run_count == 1  # failed once, not retried


# -- an evaluator given a save_dir that is not there -----------------------------------------


def test_evaluate_of_a_missing_save_dir_fails_fast(
    prefect_api: PrefectServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "tpyo"
    started = time.monotonic()
    code, error = tml(capsys, "evaluate", "--save-dir", str(missing))
    assert code == 2 and "does not exist" in error["error"] and "--wait-for-run" in error["error"]
    assert time.monotonic() - started < 30  # not the 1800 s default timeout
    assert not missing.exists()


def test_waiting_for_a_run_says_what_it_waits_for(tmp_path: Path) -> None:
    save_dir = tmp_path / "later"
    said: list[str] = []
    config_ = EvalConfig(
        save_dir=str(save_dir), partition="p", timeout=60, poll_seconds=5, wait_for_run=True
    )
    # The "sleep" is where another process would start the run: here it starts it.
    await_run(config_, log=said.append, sleep=lambda _: save_dir.mkdir())
    assert said[0].startswith(f"Waiting for a run to start writing {save_dir}")
    assert "giving up after 60s" in said[0] and said[-1] == f"{save_dir} appeared; following it."

    never = config_.model_copy(update={"save_dir": str(tmp_path / "never"), "timeout": 0.2,
                                       "poll_seconds": 0.1})  # fmt: skip
    started = time.monotonic()
    with pytest.raises(RunNotFoundError, match="no run appeared"):
        await_run(never, log=said.append)
    assert time.monotonic() - started < 5
