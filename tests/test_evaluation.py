"""Evaluation done-markers and waiting for evaluators."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from tml_checkpointing import (
    CheckpointNotFoundError,
    InvalidPartitionNameError,
    Snapshot,
    evaluated_partitions,
    get_checkpoint,
    is_done_eval,
    mark_done_eval,
    wait_for_evaluators,
)


def _checkpoint(save_dir: str, step: int = 10) -> str:
    return Snapshot(save_dir, {"model": torch.nn.Linear(2, 2)}).save(step).wait()


def test_mark_and_query_done(save_dir: str) -> None:
    checkpoint = _checkpoint(save_dir)
    assert is_done_eval(checkpoint, "validation") is False  # the original crashed here
    mark_done_eval(checkpoint, "validation")
    assert is_done_eval(checkpoint, "validation") is True
    assert is_done_eval(checkpoint, "test") is False
    mark_done_eval(checkpoint + "/", "test")
    assert evaluated_partitions(checkpoint) == ["test", "validation"]
    assert get_checkpoint(save_dir) == checkpoint  # markers do not disturb discovery


def test_marking_an_uncommitted_checkpoint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="not a committed checkpoint"):
        mark_done_eval(str(tmp_path / "5"), "validation")


@pytest.mark.parametrize("name", ["", "a/b", "..", None])
def test_bad_partition_names(tmp_path: Path, name: object) -> None:
    checkpoint = _checkpoint(str(tmp_path))
    with pytest.raises(InvalidPartitionNameError, match="partition name"):
        mark_done_eval(checkpoint, name)  # type: ignore[arg-type]


def test_wait_does_not_mutate_and_reports_pending(tmp_path: Path) -> None:
    checkpoint = _checkpoint(str(tmp_path), 7)
    mark_done_eval(checkpoint, "a")
    partitions = ["a", "b"]
    started = time.monotonic()
    result = wait_for_evaluators(str(tmp_path), partitions, 7, timeout=0.3, poll_seconds=0.05)
    assert partitions == ["a", "b"]
    assert (result.finished, result.pending, result.all_done) == (("a",), ("b",), False)
    assert time.monotonic() - started < 5


def test_wait_returns_once_evaluators_finish(save_dir: str) -> None:
    checkpoint = _checkpoint(save_dir, 3)
    evaluator = threading.Thread(target=lambda: [mark_done_eval(checkpoint, p) for p in ("x", "y")])
    evaluator.start()
    result = wait_for_evaluators(save_dir, ("x", "y"), 3, timeout=60, poll_seconds=0.05)
    evaluator.join()
    assert result.all_done and result.finished == ("x", "y") and result.checkpoint == checkpoint


def test_wait_for_a_step_never_written_times_out(tmp_path: Path) -> None:
    result = wait_for_evaluators(str(tmp_path), ["a"], 99, timeout=0.1, poll_seconds=0.02)
    assert not result and result.pending == ("a",)


@pytest.mark.parametrize("metrics", [{"": 1.0}, {"loss": "low"}, {"loss": None}])
def test_bad_metrics_are_a_named_error_and_write_nothing(tmp_path: Path, metrics: dict) -> None:
    from tml_checkpointing import (
        InvalidArgumentError,
        read_checkpoint_metrics,
        write_checkpoint_metrics,
    )

    checkpoint = _checkpoint(str(tmp_path / "run"))
    with pytest.raises(InvalidArgumentError, match="metric"):
        write_checkpoint_metrics(checkpoint, metrics)
    assert read_checkpoint_metrics(checkpoint) == {}
