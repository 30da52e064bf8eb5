"""Event-started evaluate runs (issue 20): truthful names, summaries built from storage, one
kept model, following new commits in the same process, and evaluation limits that do not pile
up. Against the session's real Prefect server; the deployed path is in test_deployment.py and
benchmarks/bench_eval_latency.py."""

from __future__ import annotations

import contextvars
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterTags,
)
from prefect.events import emit_event
from prefect.exceptions import ObjectNotFound

from flows.evaluate import EvalSummary, evaluate
from flows.train import train
from tasks.checkpoint_events import COMMITTED
from tasks.eval_limits import evaluation_limit_name, evaluation_slot, remove_limit
from tml_checkpointing import (
    get_checkpoints,
    is_done_eval,
    mark_done_eval,
    write_checkpoint_metrics,
)
from training.config import TrainConfig
from training.eval_status import describe_steps, eval_status
from training.evaluation import EvalConfig, EvalParams, LoadedModel, evaluate_checkpoint
from training.run_info import experiment_of

from .conftest import PrefectServer
from .helpers.deployed import poll

RUN: dict[str, Any] = {"epochs": 2, "steps_per_epoch": 4, "batch_size": 32, "seed": 5}
QUICK = EvalParams(partition="validation", eval_steps=2, follow_seconds=0)


def trained(save_dir: str) -> str:
    train(TrainConfig(save_dir=save_dir, checkpoint_every_steps=2, **RUN))
    assert [c.rsplit("/", 1)[-1] for c in get_checkpoints(save_dir)] == ["2", "4", "6", "8"]
    return experiment_of(save_dir)


def flow_run_name(state: Any) -> str:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(state.state_details.flow_run_id).name


def test_steps_are_said_as_ranges_of_committed_checkpoints() -> None:
    committed = [5, 10, 15, 20, 25, 30]
    assert describe_steps([5, 10, 15, 20, 25, 30], committed) == "steps 5\u201330"
    assert describe_steps([5, 15, 20, 25, 30], committed) == "steps 5, 15\u201330"
    assert describe_steps([10], committed) == "step 10"
    assert describe_steps([5, 25], committed) == "steps 5, 25"


def test_status_from_storage_lists_evaluated_and_pending(tmp_path: Path) -> None:
    from tests.training_helpers import plain_run
    from training.run_info import RunInfo, write_run_info

    config = TrainConfig(save_dir=str(tmp_path / "run"), checkpoint_every_steps=2, **RUN)
    plain_run(config)
    write_run_info(RunInfo.of(config), config.save_dir)
    two, *_ = get_checkpoints(config.save_dir)
    write_checkpoint_metrics(two, {"loss": 0.5}, partition="validation")
    mark_done_eval(two, "validation")
    status = eval_status(config.save_dir, "validation")
    assert (status.evaluated, status.pending, status.final_step) == ([2], [4, 6, 8], 8)
    assert status.checkpoints[0].metrics == {"loss": 0.5}
    assert not status.final_evaluated


def test_a_kept_model_gives_the_metrics_of_fresh_ones(tmp_path: Path) -> None:
    from tests.training_helpers import plain_run
    from training.run_info import RunInfo, write_run_info

    config = TrainConfig(save_dir=str(tmp_path / "run"), checkpoint_every_steps=2, **RUN)
    plain_run(config)
    write_run_info(RunInfo.of(config), config.save_dir)
    copy = str(tmp_path / "copy")
    shutil.copytree(config.save_dir, copy)
    kept = LoadedModel()
    with_kept = [
        evaluate_checkpoint(EvalConfig(save_dir=config.save_dir, eval_steps=2), c, model=kept)
        for c in get_checkpoints(config.save_dir)
    ]
    with_fresh = [
        evaluate_checkpoint(EvalConfig(save_dir=copy, eval_steps=2), c)
        for c in get_checkpoints(copy)
    ]
    assert kept.builds == 1
    assert [r.metrics for r in with_kept] == [r.metrics for r in with_fresh]
    assert len({r.metrics["loss"] for r in with_kept}) == 4  # each checkpoint its own weights


def test_a_burst_one_run_evaluates_all_the_next_says_who(
    prefect_api: PrefectServer, tmp_path: Path
) -> None:
    save_dir = str(tmp_path / "burst")
    experiment = trained(save_dir)
    limit = evaluation_limit_name(experiment, "validation")
    summary_key = f"eval-summary-validation-{experiment}"

    first = evaluate(save_dir, QUICK, checkpoint=f"{save_dir}/4", return_state=True)
    done: EvalSummary = first.result()
    assert first.message == "validation · steps 2\u20138"
    assert flow_run_name(first) == f"evaluate · {experiment} · validation · steps 2\u20138"
    assert (done.evaluated, done.pending, done.reached_final) == ([2, 4, 6, 8], [], True)
    assert done.model_builds == 1  # one model for four checkpoints
    with get_client(sync_client=True) as client:
        with pytest.raises(ObjectNotFound):  # the final checkpoint is evaluated: limit removed
            client.read_global_concurrency_limit_by_name(limit)
        (summary,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[summary_key]))
        )
    assert "Reached the final checkpoint: True" in str(summary.data)
    assert "Evaluated 4 of 4 committed checkpoints; pending: none" in str(summary.data)

    second = evaluate(save_dir, QUICK, checkpoint=f"{save_dir}/6", return_state=True)
    nothing: EvalSummary = second.result()
    shared = f"evaluate · {experiment} · validation · "
    assert flow_run_name(first).startswith(shared)
    by = flow_run_name(first).removeprefix(shared)
    said = f'nothing to do: step 6 was evaluated by "{by}"'
    assert second.message == f"validation · {said}"
    assert flow_run_name(second) == f"evaluate · {experiment} · validation · {said}"
    assert (nothing.evaluated, nothing.skipped, nothing.model_builds) == ([], [6], 0)
    with get_client(sync_client=True) as client:
        versions = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[summary_key]))
        )
        with pytest.raises(ObjectNotFound):  # the run that found nothing left no limit
            client.read_global_concurrency_limit_by_name(limit)
    assert len(versions) == 1  # the newest summary is still the one that evaluated


def test_a_waiter_whose_limit_vanished_creates_it_again(
    prefect_api: PrefectServer, tmp_path: Path
) -> None:
    name = evaluation_limit_name("vanishing-limit", "validation")
    said: list[str] = []
    held = threading.Event()
    release = threading.Event()

    def waiter() -> None:
        with evaluation_slot(name, log=said.append):
            held.set()
            release.wait(60)

    thread = threading.Thread(target=contextvars.copy_context().run, args=(waiter,))
    with evaluation_slot(name):
        thread.start()
        poll(lambda: list(said), bool, "the waiter waiting for the slot", limit_s=60)
        assert not held.is_set()
        assert remove_limit(name)  # the holder saw the final checkpoint evaluated
    try:
        assert held.wait(60), "the waiter never got the re-created slot"
        with get_client(sync_client=True) as client:
            limit = client.read_global_concurrency_limit_by_name(name)
        assert (limit.limit, limit.active_slots) == (1, 1)
    finally:
        release.set()
        thread.join(60)
    assert remove_limit(name)


def test_a_following_run_evaluates_new_commits_in_the_same_process(
    prefect_api: PrefectServer, tmp_path: Path
) -> None:
    """Commits arrive one by one after the run started: each woken by its event (the fallback
    listing comes only every 60 s), restored into the one model, by the one flow run."""
    source = str(tmp_path / "source")
    trained(source)
    save_dir = str(tmp_path / "followed")
    os.makedirs(save_dir)
    shutil.copy(f"{source}/run.json", f"{save_dir}/run.json")
    experiment = experiment_of(save_dir)

    def commit(step: int) -> str:
        staged = f"{save_dir}/.staged-{step}"
        shutil.copytree(f"{source}/{step}", staged)
        os.rename(staged, f"{save_dir}/{step}")  # appears whole, as a commit does
        emit_event(
            event=COMMITTED,
            resource={"prefect.resource.id": f"{save_dir}/{step}", "tml.save_dir": save_dir},
        )
        return f"{save_dir}/{step}"

    first = commit(2)
    outcome: dict[str, Any] = {}
    params = EvalParams(eval_steps=2, follow_seconds=120, poll_seconds=60)

    def evaluator() -> None:
        outcome["state"] = evaluate(save_dir, params, checkpoint=first, return_state=True)

    thread = threading.Thread(target=contextvars.copy_context().run, args=(evaluator,))
    thread.start()
    try:
        for step in (2, 4, 6):
            poll(
                lambda s=step: is_done_eval(f"{save_dir}/{s}", "validation"),  # type: ignore[misc]
                bool,
                f"step {step} evaluated by the following run",
                limit_s=45,  # under poll_seconds: only the event can have woken it
            )
            commit(step + 2)
        thread.join(120)
    finally:
        thread.join(120)
    assert not thread.is_alive()
    state = outcome["state"]
    summary: EvalSummary = state.result()
    assert summary.evaluated == [2, 4, 6, 8]
    assert summary.model_builds == 1
    assert state.message == "validation · steps 2\u20138"
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"experiment:{experiment}"]))
        )
    assert [r.name for r in runs] == [f"evaluate · {experiment} · validation · steps 2\u20138"]
