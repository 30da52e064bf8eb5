"""The ``train`` flow against a real Prefect server: skips, retries, crash and resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import TaskRun

from flows.train import TrainResult, train
from training.config import TrainConfig
from training.experiment import derived_experiment

from .conftest import PrefectServer
from .training_helpers import assert_bit_identical, checkpoint_tensors, flow_params, plain_run

SMALL: dict[str, Any] = {"epochs": 3, "steps_per_epoch": 4, "batch_size": 64, "seed": 3}


def task_runs(flow_run_id: UUID) -> dict[str, TaskRun]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return {run.name: run for run in runs}


def run_flow(**params: Any) -> tuple[Any, UUID]:
    state = train(*flow_params(**params), return_state=True)
    return state, state.state_details.flow_run_id


def test_train_then_rerun_skips_every_epoch(prefect_api: PrefectServer, tmp_path: Path) -> None:
    save_dir = str(tmp_path / "run")
    state, _ = run_flow(save_dir=save_dir, **SMALL)
    first: TrainResult = state.result()
    assert (first.epochs_run, first.epochs_skipped, first.final_step) == ([0, 1, 2], [], 12)
    assert first.checkpoint == f"{save_dir}/12"

    state, flow_run_id = run_flow(save_dir=save_dir, **SMALL)
    again: TrainResult = state.result()
    assert (again.epochs_run, again.epochs_skipped) == ([], [0, 1, 2])
    assert again.resumed_from == f"{save_dir}/12"
    runs = task_runs(flow_run_id)
    name = derived_experiment(save_dir)
    assert sorted(runs) == [f"epoch {epoch} · {name}" for epoch in range(3)]
    assert {run.state.name for run in runs.values()} == {"Skipped"}
    assert all(run.state.is_completed() for run in runs.values())
    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts() if a.key}
    assert {f"train-epochs-{name}", f"train-summary-{name}", f"train-progress-{name}"} <= keys


def test_injected_failure_is_retried_and_ends_bit_identical(
    prefect_api: PrefectServer, tmp_path: Path
) -> None:
    reference = TrainConfig(save_dir=str(tmp_path / "ref"), checkpoint_every_steps=3, **SMALL)
    plain_run(reference)
    save_dir = str(tmp_path / "run")
    state, flow_run_id = run_flow(
        save_dir=save_dir, checkpoint_every_steps=3, fail_at_step=7, **SMALL
    )
    assert state.is_completed()
    runs = task_runs(flow_run_id)
    name = derived_experiment(save_dir)
    assert runs[f"epoch 1 · {name}"].run_count == 2  # failed once at step 7, retried
    assert runs[f"epoch 0 · {name}"].run_count == 1
    assert_bit_identical(checkpoint_tensors(save_dir), checkpoint_tensors(reference.save_dir))


def test_crash_in_epoch_3_resumes_from_epoch_3(prefect_api: PrefectServer, tmp_path: Path) -> None:
    params = {**SMALL, "epochs": 5}
    reference = TrainConfig(save_dir=str(tmp_path / "ref"), **params)
    plain_run(reference)
    save_dir = str(tmp_path / "run")
    state, _ = run_flow(save_dir=save_dir, fail_at_step=14, epoch_retries=0, **params)
    assert state.is_failed()
    state, _ = run_flow(save_dir=save_dir, **params)
    result: TrainResult = state.result()
    assert (result.epochs_skipped, result.epochs_run) == ([0, 1, 2], [3, 4])
    assert_bit_identical(checkpoint_tensors(save_dir), checkpoint_tensors(reference.save_dir))


def test_train_on_s3(prefect_api: PrefectServer, s3_save_dir: str) -> None:
    state, _ = run_flow(save_dir=s3_save_dir, **{**SMALL, "epochs": 1})
    result: TrainResult = state.result()
    assert result.checkpoint == f"{s3_save_dir}/4"
    assert checkpoint_tensors(s3_save_dir)


def test_flow_retry_resumes_and_ends_bit_identical(
    prefect_api: PrefectServer, tmp_path: Path
) -> None:
    """With epoch retries off, the failure fails the flow run; the flow retry resumes it."""
    reference = TrainConfig(save_dir=str(tmp_path / "ref"), **SMALL)
    plain_run(reference)
    save_dir = str(tmp_path / "run")
    state = train.with_options(retries=1, retry_delay_seconds=0)(
        *flow_params(save_dir=save_dir, fail_at_step=6, epoch_retries=0, **SMALL),
        return_state=True,
    )
    assert state.is_completed()
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(state.state_details.flow_run_id)
    assert flow_run.run_count == 2
    result: TrainResult = state.result()
    assert result.epochs_skipped == [0] and result.epochs_run == [1, 2]
    assert_bit_identical(checkpoint_tensors(save_dir), checkpoint_tensors(reference.save_dir))
