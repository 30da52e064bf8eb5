"""``prefect.yaml`` end to end on loopback, as a user deploys it (README "Deploy").

Against the session's real ``prefect server``: create the process work pool, ``prefect
--no-prompt deploy --all`` from the repository root, ``prefect deployment run 'train/train'``,
a ``prefect worker`` started from an unrelated directory (the pull step must lead each flow
run to the code), then check through the API that the run completed, its checkpoints exist,
each ``tml.checkpoint.committed`` event started an ``evaluate`` run that nobody asked for, every
checkpoint was evaluated exactly once, the per-run artifacts carry the experiment's keys, and
the nightly retraining schedule created its future runs.

Every CLI process runs the repository's code (``cwd`` and ``PYTHONPATH`` = the repository root)
in its own process group, killed in ``finally`` whatever happens.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType

from flows.automations import load as load_automations
from tml_checkpointing import get_checkpoint, get_checkpoints, is_done_eval, step_from_checkpoint

from .conftest import PrefectServer
from .helpers.deployed import (
    POOL,
    REPO_ROOT,
    cli_env,
    deploy_all,
    kill_tree,
    poll,
    remove_project_automations,
    run_deployment,
    start_worker,
)


@pytest.mark.timeout(420)
def test_deploy_run_with_worker_events_and_nightly_schedule(
    prefect_api: PrefectServer, tmp_path: Path
) -> None:
    env = cli_env(prefect_api)
    deploy_all(env)

    save_dir = tmp_path / "run"
    flow_run_id = run_deployment(
        env,
        "train/train",
        "--param",  # the flow's `config` model, as JSON (replaces the deployment's)
        "config="
        + json.dumps(
            {"save_dir": str(save_dir), "epochs": 2, "steps_per_epoch": 2, "batch_size": 32}
        ),
    )

    # A worker started elsewhere: only the deployment's pull step leads it to the code. It
    # serves the train run and the evaluate runs the checkpoint events start.
    worker_log = tmp_path / "worker.log"
    worker = start_worker(env, tmp_path / "worker-cwd", worker_log)
    try:
        check_project_automations()
        check_deployed_runs(flow_run_id, save_dir, worker_log)
    finally:
        kill_tree(worker)
        # Later tests' checkpoints must not start evaluate runs that no worker serves.
        remove_project_automations()


def check_project_automations() -> None:
    """Deploying applied automations.yaml once per name (the build step ran for each of the
    four deployments, updating in place), with the names and descriptions of the file."""
    with get_client(sync_client=True) as client:
        for expected in load_automations():
            found = client.read_automations_by_name(expected.name)
            assert len(found) == 1, (expected.name, found)
            assert found[0].description == expected.description
            assert found[0].enabled


def check_deployed_runs(flow_run_id: UUID, save_dir: Path, worker_log: Path) -> None:
    def worker_output() -> str:
        return worker_log.read_text()[-5000:]

    with get_client(sync_client=True) as client:
        run: FlowRun = poll(
            lambda: client.read_flow_run(flow_run_id),
            lambda r: r.state is not None and r.state.is_final(),
            "train flow run final",
            limit_s=180,
        )
        assert run.state is not None
        assert run.state.type == StateType.COMPLETED, f"{run.state!r}\n{worker_output()}"
        assert run.parameters["config"]["save_dir"] == str(save_dir)
        # Flow retries set by the deployment's job variables reached the flow run.
        assert run.empirical_policy.retries == 1
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
        assert {"train-epochs-run", "train-summary-run"} <= {a.key for a in artifacts if a.key}
        assert run.name.startswith("train · run · epochs="), run.name

        deployments = {
            name: client.read_deployment_by_name(name)
            for name in ("train/train", "evaluate/evaluate", "retrain/retrain-nightly")
        }
        for deployment in deployments.values():
            assert deployment.work_pool_name == POOL
            assert deployment.pull_steps == [
                {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO_ROOT)}}
            ]
        train_config = deployments["train/train"].parameters["config"]
        assert train_config["save_dir"] == f"{REPO_ROOT}/runs/train"

        nightly = deployments["retrain/retrain-nightly"]
        assert nightly.global_concurrency_limit is not None
        assert nightly.global_concurrency_limit.limit == 1
        assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in nightly.schedules] == [
            ("0 2 * * *", "UTC", True)
        ]
        scheduled = poll(
            lambda: client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[nightly.id])),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(
                        type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])
                    )
                ),
            ),
            bool,
            "scheduled runs of retrain-nightly",
        )

        check_event_started_evaluations(client, save_dir, worker_output)

    checkpoint = get_checkpoint(str(save_dir))
    assert checkpoint == f"{save_dir}/4"
    assert step_from_checkpoint(checkpoint) == 4

    now = datetime.now(UTC)
    starts = sorted(r.expected_start_time for r in scheduled if r.expected_start_time)
    assert len(starts) == len(scheduled)
    for start in starts:
        start_utc = start.astimezone(UTC)
        assert (start_utc.hour, start_utc.minute, start_utc.second) == (2, 0, 0), start
        assert start_utc > now
    assert starts[0] - now <= timedelta(days=1)  # the next 02:00 UTC is among them


def check_event_started_evaluations(
    client: SyncPrefectClient, save_dir: Path, worker_output: Callable[[], str]
) -> None:
    """Each committed checkpoint's event started an evaluate run by itself; together they
    evaluated every checkpoint exactly once, and the run's checkpoint table shows the metrics."""
    evaluate = client.read_deployment_by_name("evaluate/evaluate")
    checkpoints = get_checkpoints(str(save_dir))
    assert checkpoints == [f"{save_dir}/2", f"{save_dir}/4"]

    def evaluate_runs() -> list[FlowRun]:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[evaluate.id]))
        )
        return [r for r in runs if r.parameters.get("save_dir") == str(save_dir)]

    runs = poll(
        evaluate_runs,
        lambda runs: (
            len(runs) == len(checkpoints)
            and all(r.state is not None and r.state.is_final() for r in runs)
        ),
        "evaluate runs started by checkpoint events, finished",
        limit_s=180,
    )
    for run in runs:
        assert run.state is not None
        assert run.state.type == StateType.COMPLETED, f"{run.state!r}\n{worker_output()}"
        assert run.created_by is not None and run.created_by.type == "AUTOMATION", run.created_by
        assert run.parameters["params"]["partition"] == "validation"  # the deployment's own
    assert sorted(r.parameters["checkpoint"] for r in runs) == checkpoints
    assert sorted(r.name for r in runs) == [
        f"evaluate · run · partition=validation · step {step}" for step in (2, 4)
    ]

    task_runs = client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id for r in runs]))
    )
    evaluated = Counter(t.name for t in task_runs if t.state and t.state.name == "Completed")
    assert evaluated == {"validation-step-2": 1, "validation-step-4": 1}, task_runs
    assert all(is_done_eval(c, "validation") for c in checkpoints)

    table = client.read_latest_artifacts(
        artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["checkpoints-run"]))
    )
    rows = json.loads(table[0].data) if isinstance(table[0].data, str) else table[0].data
    assert [(row["step"], row["validation/loss"] is not None) for row in rows] == [
        (2, True),
        (4, True),
    ]
