"""Evaluation beside training, waiting for evaluators, retraining with warm start, one writer."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from flows.evaluate import EvalSummary, evaluate
from flows.retrain import Lineage, read_lineage, retrain
from flows.train import train
from recipes.base import RecipeError
from tml_checkpointing import (
    evaluated_partitions,
    get_checkpoint,
    get_checkpoints,
    mark_done_eval,
    read_checkpoint_metrics,
    step_from_checkpoint,
)
from tml_checkpointing.format.layout import WRITER_LOCK as LOCK_NAME
from training.config import RunParams, TrainConfig
from training.evaluation import EvalParams
from training.experiment import derived_experiment

from .conftest import PrefectServer
from .training_helpers import assert_bit_identical, checkpoint_tensors, flow_params, plain_run

TINY: dict[str, Any] = {"steps_per_epoch": 4, "batch_size": 32, "seed": 5}


def tml(*args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *args]


def test_evaluator_beside_training_evaluates_each_checkpoint_once(
    prefect_api: PrefectServer, tmp_path: Path
) -> None:
    save_dir = str(tmp_path / "run")
    trainer = subprocess.Popen(
        tml("train", "--save-dir", save_dir, "--epochs", "3", "--steps-per-epoch", "4",
            "--batch-size", "32", "--checkpoint-every-steps", "2",
            "--wait-for-evaluator", "validation", "--evaluator-timeout", "120", "--json"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=prefect_api.env(),
    )  # fmt: skip
    try:
        summary: EvalSummary = evaluate(  # started beside the trainer: the dir may not exist yet
            save_dir, EvalParams(partition="validation", eval_steps=2, timeout=120,
                                 poll_seconds=0.2, wait_for_run=True),
        )  # fmt: skip
        out, err = trainer.communicate(timeout=180)
    finally:
        trainer.kill()
    assert trainer.returncode == 0, err[-3000:]
    trained = json.loads(out.strip().splitlines()[-1])
    assert trained["evaluators_finished"] == ["validation"]
    assert trained["evaluators_pending"] == []

    committed = [step_from_checkpoint(c) for c in get_checkpoints(save_dir)]
    assert committed == [2, 4, 6, 8, 10, 12]
    assert summary.evaluated == committed  # each one, in order, exactly once
    assert summary.reached_final and summary.final_step == 12
    for checkpoint in get_checkpoints(save_dir):
        assert evaluated_partitions(checkpoint) == ["validation"]
        assert read_checkpoint_metrics(checkpoint, partition="validation")["examples"] == 64
        assert "validation/loss" in read_checkpoint_metrics(checkpoint)

    again = evaluate(save_dir, EvalParams(partition="validation", eval_steps=2, timeout=5))
    assert (again.evaluated, again.skipped) == ([], committed)

    # The train run's own table, published once its evaluators finished, holds their metrics.
    with get_client(sync_client=True) as client:
        versions = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[f"checkpoints-{derived_experiment(save_dir)}"])
            )
        )
    (final,) = [v for v in versions if (v.description or "").startswith("After its evaluators")]
    rows = json.loads(final.data) if isinstance(final.data, str) else final.data
    assert [row["step"] for row in rows] == committed
    assert all(row["validation/loss"] is not None for row in rows)


def test_train_reports_evaluators_that_did_not_finish(
    prefect_api: PrefectServer, tmp_path: Path
) -> None:
    result = train(
        *flow_params(
            save_dir=str(tmp_path / "run"),
            epochs=1,
            wait_for_evaluators=["nobody"],
            evaluator_timeout=0.3,
            **TINY,
        )
    )
    assert (result.evaluators_finished, result.evaluators_pending) == ([], ["nobody"])


def test_retrain_twice_warm_starts_from_the_previous_run(
    prefect_api: PrefectServer, tmp_path: Path
) -> None:
    runs_dir = str(tmp_path / "runs")
    params: dict[str, Any] = {"run": RunParams(epochs=1, **TINY), "eval_steps": 2}
    first: Lineage = retrain(runs_dir=runs_dir, run_name="20261128T020000Z", **params)
    assert (first.previous_run, first.warm_start_checkpoint) == (None, None)
    assert first.final_checkpoint == f"{runs_dir}/20261128T020000Z/4"
    assert "validation" in first.metrics

    second: Lineage = retrain(runs_dir=runs_dir, run_name="20261129T020000Z", **params)
    assert second.previous_run == f"{runs_dir}/20261128T020000Z"
    with get_client(sync_client=True) as client:  # readable in the runs list
        named = client.read_flow_run(UUID(str(second.flow_run_id))).name
    assert named == f"retrain · {derived_experiment(runs_dir)} · 20261129T020000Z"
    assert second.warm_start_checkpoint == first.final_checkpoint
    assert read_lineage(second.run_dir) == second  # recorded next to the run
    # The lineage artifact puts each metric beside the previous night's.
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_latest_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[f"retrain-lineage-{derived_experiment(runs_dir)}"])
            )
        )
        (summary,) = client.read_latest_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[f"train-summary-{derived_experiment(second.run_dir)}"])
            )
        )
        # Both nights side by side: parameters, best checkpoint, evaluation losses.
        (compared,) = client.read_latest_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[f"compare-{derived_experiment(runs_dir)}"])
            )
        )
    table = json.loads(compared.data) if isinstance(compared.data, str) else compared.data
    by_run = {row["run"]: row for row in table}
    assert set(by_run) == {"20261128T020000Z", "20261129T020000Z"}
    for lineage, row in ((first, by_run["20261128T020000Z"]), (second, by_run["20261129T020000Z"])):
        assert row["best step"] == 4 and row["best checkpoint"] == lineage.final_checkpoint
        assert row["final eval loss"] == pytest.approx(
            lineage.metrics["validation"]["loss"], abs=1e-5
        )
        assert (row["lr"], row["batch_size"], row["epochs"]) == (
            params["run"].lr,
            params["run"].batch_size,
            1,
        )
    now, before = second.metrics["validation"]["loss"], first.metrics["validation"]["loss"]
    assert f"| validation/loss | {now:.4f} | {before:.4f} | {now - before:+.4f} |" in artifact.data
    assert f"- resumed from: warm start from `{first.final_checkpoint}`" in summary.data

    warm = TrainConfig(
        save_dir=str(tmp_path / "warm-reference"),
        epochs=1,
        initial_checkpoint=first.final_checkpoint,
        **TINY,
    )
    plain_run(warm)
    assert_bit_identical(checkpoint_tensors(second.run_dir), checkpoint_tensors(warm.save_dir))
    cold = checkpoint_tensors(first.run_dir)  # same recipe and seed, but from scratch
    assert any(
        not cold[k].equal(v) for k, v in checkpoint_tensors(second.run_dir).items() if "model" in k
    )


def test_second_writer_on_the_same_save_dir_is_refused(
    prefect_api: PrefectServer, tmp_path: Path
) -> None:
    """The first run holds save_dir until it ends: here, while it waits for an evaluator."""
    save_dir = str(tmp_path / "run")
    first = subprocess.Popen(
        tml("train", "--save-dir", save_dir, "--epochs", "2", "--steps-per-epoch", "4",
            "--batch-size", "32", "--seed", "5", "--wait-for-evaluator", "gate",
            "--evaluator-timeout", "120", "--json"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=prefect_api.env(),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while get_checkpoint(save_dir, missing_ok=True) != f"{save_dir}/8":
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "first run never committed its final checkpoint"
            time.sleep(0.05)  # polling the directory: another process writes it
        assert (tmp_path / "run" / LOCK_NAME).exists()
        state = train(TrainConfig(save_dir=save_dir, epochs=2, **TINY), return_state=True)
        assert state.is_failed()
        with pytest.raises(Exception, match="is being written by train flow run"):
            state.result()
        mark_done_eval(f"{save_dir}/8", "gate")  # lets the first run finish
        out, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["evaluators_finished"] == ["gate"]
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # released at the end
    reference = TrainConfig(save_dir=str(tmp_path / "reference"), epochs=2, **TINY)
    plain_run(reference)
    assert [step_from_checkpoint(c) for c in get_checkpoints(save_dir)] == [4, 8]
    assert_bit_identical(checkpoint_tensors(save_dir), checkpoint_tensors(reference.save_dir))


def test_retrain_refused_at_start_writes_nothing(
    prefect_api: PrefectServer, tmp_path: Path
) -> None:
    """lineage.json used to be written before train looked at the recipe."""
    runs_dir = tmp_path / "runs"
    state = retrain(
        runs_dir=str(runs_dir), run_name="20261130T020000Z",
        run=RunParams(recipe="nosuch:build", epochs=1, **TINY), return_state=True,
    )  # fmt: skip
    assert state.is_failed()
    with pytest.raises(RecipeError, match="cannot import recipe module 'nosuch'"):
        state.result()
    assert not runs_dir.exists()
