"""Comparing runs without Prefect: the best-checkpoint rule, step-level training losses written
by the loop (also across a resume and a retry), the per-run table and curve, the comparison of
the runs under one root, and the best mark in ``tml checkpoints list``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tml_checkpointing import get_checkpoints, read_checkpoint_metrics, write_checkpoint_metrics
from tml_checkpointing.catalog.best import BEST_MARK, best_metric, best_step
from tml_checkpointing.cli import main
from training.checkpoint_table import checkpoint_rows, run_step_losses, table_rows
from training.config import TrainConfig
from training.loop import InjectedFailure, train_epoch
from training.loss_curve import loss_curve_png
from training.run_comparison import compare_runs, comparison_png
from training.run_info import RunInfo, write_run_info
from training.session import close_session, get_session
from training.step_losses import read_step_losses

from .training_helpers import plain_run

SMALL = {"epochs": 3, "steps_per_epoch": 4, "batch_size": 32, "seed": 3}
PNG = b"\x89PNG\r\n\x1a\n"


def recorded_run(save_dir: Path, **overrides: object) -> TrainConfig:
    """A trained run with its run.json (what the train flow records at its first start)."""
    config = TrainConfig(save_dir=str(save_dir), **{**SMALL, **overrides})
    write_run_info(RunInfo.of(config), config.save_dir)
    plain_run(config)
    return config


def evaluate(save_dir: str, losses: dict[int, float], partition: str = "validation") -> None:
    """What an evaluator leaves next to each checkpoint (its metrics file), given losses."""
    for step, loss in losses.items():
        write_checkpoint_metrics(f"{save_dir}/{step}", {"loss": loss}, partition=partition)


# -- the rule ------------------------------------------------------------------------------


def test_best_is_the_lowest_validation_loss_else_the_first_partition_alphabetically() -> None:
    metrics = {
        2: {"validation/loss": 0.5, "test/loss": 0.1, "validation/auc": 0.9},
        4: {"validation/loss": 0.3, "test/loss": 0.4},
        6: {"validation/loss": 0.4},
    }
    assert best_metric(name for m in metrics.values() for name in m) == "validation/loss"
    assert best_step(metrics) == 4
    assert best_step(metrics, metric="test/loss") == 2
    no_validation = {2: {"test/loss": 0.1, "b/loss": 0.9}, 4: {"test/loss": 0.2, "b/loss": 0.1}}
    assert best_metric(["test/loss", "b/loss", "b/auc"]) == "b/loss"
    assert best_step(no_validation) == 4  # by b/loss (0.9, 0.1), not test/loss
    assert best_step({2: {"a/loss": 0.2}, 4: {"a/loss": 0.2}}) == 2  # a tie: reached first
    assert best_step({2: {"a/loss": math.nan}, 4: {"a/loss": 0.7}}) == 4  # NaN never wins
    assert best_step({2: {"train_loss": 0.1}, 4: {}}) is None  # nothing evaluated
    assert best_step({}) is None


# -- step-level training losses --------------------------------------------------------------


def test_every_step_loss_is_recorded_next_to_its_checkpoint(tmp_path: Path) -> None:
    config = recorded_run(tmp_path / "run", checkpoint_every_steps=2)
    checkpoints = get_checkpoints(config.save_dir)
    assert [c.rsplit("/", 1)[-1] for c in checkpoints] == ["2", "4", "6", "8", "10", "12"]
    covered: list[int] = []
    for checkpoint in checkpoints:
        losses = read_step_losses(checkpoint)
        step = int(checkpoint.rsplit("/", 1)[-1])
        assert [s for s, _ in losses] == [step - 1, step]
        # The checkpoint's mean training loss is the mean of exactly these steps.
        mean = read_checkpoint_metrics(checkpoint)["train_loss"]
        assert mean == pytest.approx(sum(loss for _, loss in losses) / 2)
        covered += [s for s, _ in losses]
    assert covered == list(range(1, 13))
    assert [s for s, _ in run_step_losses(checkpoint_rows(config.save_dir))] == covered
    # The file is metadata, like metrics.json: a full verification still passes.
    assert main(["checkpoints", "verify", config.save_dir, "--json"]) == 0


def test_step_losses_survive_a_resume_and_a_retry(tmp_path: Path) -> None:
    reference = recorded_run(tmp_path / "ref")
    config = TrainConfig(save_dir=str(tmp_path / "run"), fail_at_step=7, **SMALL)
    plain_run(config, range(1))  # epoch 0, then the process is gone
    session = get_session(config)  # a new process resumes
    try:
        with pytest.raises(InjectedFailure):
            train_epoch(session, 1)  # dies at step 7: nothing of steps 5-6 is committed
        train_epoch(session, 1)  # the retry retrains 5-8
        train_epoch(session, 2)
    finally:
        close_session(config)
    resumed = run_step_losses(checkpoint_rows(config.save_dir))
    assert [step for step, _ in resumed] == list(range(1, 13))
    # Deterministic training: the same losses as the uninterrupted run, step by step.
    uninterrupted = run_step_losses(checkpoint_rows(reference.save_dir))
    assert [loss for _, loss in resumed] == pytest.approx([loss for _, loss in uninterrupted])
    assert read_checkpoint_metrics(f"{config.save_dir}/8")["train_attempt"] == 1.0


def test_an_unreadable_step_losses_file_is_left_out(tmp_path: Path) -> None:
    config = recorded_run(tmp_path / "run", epochs=1)
    (tmp_path / "run" / "4" / "train_losses.json").write_text("{not json")
    assert read_step_losses(f"{config.save_dir}/4") == []
    # The table still has the checkpoint, and the curve falls back to its mean loss.
    (row,) = checkpoint_rows(config.save_dir)
    assert run_step_losses([row]) == [(4, pytest.approx(row.train_loss))]


# -- the per-run table and curve ---------------------------------------------------------------


def test_table_puts_evaluation_losses_beside_the_train_loss_and_marks_the_best(
    tmp_path: Path,
) -> None:
    config = recorded_run(tmp_path / "run", checkpoint_every_steps=2)
    evaluate(config.save_dir, {4: 0.61, 8: 0.52, 12: 0.55})
    evaluate(config.save_dir, {4: 0.1, 8: 0.9}, partition="test")
    write_checkpoint_metrics(f"{config.save_dir}/8", {"auc": 0.7}, partition="validation")
    rows = table_rows(checkpoint_rows(config.save_dir))
    assert list(rows[0]) == [
        "step",
        "epoch",
        "kind",
        "train loss",
        "test/loss",
        "validation/loss",
        "best",
        "validation/auc",
        "attempt",
        "MiB",
        "path",
    ]
    assert all(list(row) == list(rows[0]) for row in rows)  # the same columns in every row
    assert [row["step"] for row in rows if row["best"] == BEST_MARK] == [8]  # validation rules
    assert [row["best"] for row in rows].count("") == len(rows) - 1
    assert rows[1]["validation/loss"] == 0.61 and rows[0]["validation/loss"] is None

    png = loss_curve_png(checkpoint_rows(config.save_dir), title="run: loss by step")
    assert png.startswith(PNG)


def test_no_best_mark_before_any_evaluation(tmp_path: Path) -> None:
    config = recorded_run(tmp_path / "run", epochs=1)
    rows = table_rows(checkpoint_rows(config.save_dir))
    assert [row["best"] for row in rows] == [""]
    assert "validation/loss" not in rows[0]


def test_checkpoints_list_marks_the_best(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = recorded_run(tmp_path / "run", epochs=2)
    assert main(["checkpoints", "list", config.save_dir, "--json"]) == 0
    assert [row["best"] for row in json.loads(capsys.readouterr().out)] == [False, False]

    evaluate(config.save_dir, {4: 0.3, 8: 0.4})
    assert main(["checkpoints", "list", config.save_dir, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(row["step"], row["best"]) for row in listed] == [(4, True), (8, False)]

    assert main(["checkpoints", "list", config.save_dir]) == 0
    table = capsys.readouterr().out
    (starred,) = [line for line in table.splitlines() if BEST_MARK in line and "│" in line]
    assert starred.split("│")[1].strip() == "4"  # the step column of the one starred row
    assert f"{BEST_MARK}: lowest validation/loss" in table


# -- across runs ------------------------------------------------------------------------------


def test_runs_under_one_root_are_compared(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    slow = recorded_run(root / "lr-0.001", lr=0.001, checkpoint_every_steps=2)
    fast = recorded_run(root / "lr-0.01", lr=0.01)
    (root / "notes").mkdir()  # not a run: no run.json
    (root / "lineage.json").write_text("{}")
    evaluate(slow.save_dir, {2: 0.70, 6: 0.60, 10: 0.65})
    evaluate(fast.save_dir, {4: 0.50, 8: 0.40, 12: 0.45})

    runs = compare_runs(str(root))
    assert [run.run for run in runs] == ["lr-0.001", "lr-0.01"]
    by_name = {run.run: run.as_table_row() for run in runs}
    slow_row, fast_row = by_name["lr-0.001"], by_name["lr-0.01"]
    assert (slow_row["lr"], fast_row["lr"]) == (0.001, 0.01)
    assert slow_row["save_dir"] == slow.save_dir
    for row in (slow_row, fast_row):
        assert (row["recipe"], row["batch_size"], row["seed"]) == (slow.recipe, 32, 3)
        assert (row["steps_per_epoch"], row["world_size"], row["epochs"]) == (4, 1, 3)
        assert row["eval metric"] == "validation/loss"
    assert (slow_row["best step"], slow_row["best eval loss"]) == (6, 0.6)
    assert slow_row["best checkpoint"] == f"{slow.save_dir}/6"
    assert slow_row["final eval loss"] == 0.65  # of step 10, the newest evaluated (not 12)
    assert slow_row["checkpoints"] == 6
    assert (fast_row["best step"], fast_row["best checkpoint"]) == (8, f"{fast.save_dir}/8")
    assert (fast_row["final eval loss"], fast_row["checkpoints"]) == (0.45, 3)
    assert isinstance(fast_row["final train loss"], float)

    assert comparison_png(runs, title="sweep").startswith(PNG)
    assert compare_runs(str(tmp_path / "nowhere")) == []
