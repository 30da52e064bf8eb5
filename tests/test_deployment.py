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
import statistics
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
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.events.schemas.events import ResourceSpecification

from flows.automations import load as load_automations
from tasks.eval_limits import evaluation_limit_name
from tml_checkpointing import (
    get_checkpoint,
    get_checkpoints,
    is_done_eval,
    read_checkpoint_metrics,
    step_from_checkpoint,
)
from tml_checkpointing.catalog.evaluation import metrics_path
from tml_checkpointing.format.layout import COMMIT_MARKER
from training.experiment import derived_experiment
from training.run_info import experiment_of

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

    # Three runs at once: two whose directories share their last part (their experiments must
    # share nothing), and a second learning rate beside the first (one comparison of both).
    save_dir = tmp_path / "x" / "demo"
    namesake = tmp_path / "x" / "sweep" / "demo"
    other_lr = tmp_path / "x" / "demo-lr"
    small = {"epochs": 2, "steps_per_epoch": 2, "batch_size": 32}
    flow_run_ids = {
        directory: run_deployment(
            env,
            "train/train",
            "--param",  # the flow's `config` model, as JSON (replaces the deployment's)
            "config=" + json.dumps({"save_dir": str(directory), **small, **extra}),
        )
        for directory, extra in (
            (save_dir, {}),
            (namesake, {}),
            (other_lr, {"lr": 0.05}),
        )
    }

    # A worker started elsewhere: only the deployment's pull step leads it to the code. It
    # serves the train runs and the evaluate runs the checkpoint events start.
    worker_log = tmp_path / "worker.log"
    worker = start_worker(env, tmp_path / "worker-cwd", worker_log)
    try:
        check_project_automations()
        check_deployed_runs(flow_run_ids[save_dir], save_dir, worker_log)
        with get_client(sync_client=True) as client:
            for directory in (namesake, other_lr):
                check_train_run(client, flow_run_ids[directory], directory, worker_log)
                check_event_started_evaluations(
                    client, directory, lambda: worker_log.read_text()[-5000:]
                )
            check_identities_never_mix(client, flow_run_ids, save_dir, namesake)
            check_comparison(client, save_dir, other_lr)
        report_commit_to_metrics_latency(list(flow_run_ids))
    finally:
        kill_tree(worker)
        # Later tests' checkpoints must not start evaluate runs that no worker serves.
        remove_project_automations()


def check_train_run(
    client: SyncPrefectClient, flow_run_id: UUID, save_dir: Path, worker_log: Path
) -> FlowRun:
    """The train run of ``save_dir`` completed, named and keyed after its experiment."""
    run: FlowRun = poll(
        lambda: client.read_flow_run(flow_run_id),
        lambda r: r.state is not None and r.state.is_final(),
        "train flow run final",
        limit_s=180,
    )
    assert run.state is not None
    assert run.state.type == StateType.COMPLETED, f"{run.state!r}\n{worker_log.read_text()[-5000:]}"
    assert run.parameters["config"]["save_dir"] == str(save_dir)
    experiment = experiment_of(str(save_dir))
    assert experiment == derived_experiment(str(save_dir))  # none given: derived
    assert run.name.startswith(f"train · {experiment} · epochs="), run.name
    assert f"experiment:{experiment}" in run.tags
    artifacts = client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
    )
    keys = {a.key for a in artifacts if a.key}
    assert {f"train-epochs-{experiment}", f"train-summary-{experiment}"} <= keys
    return run


def check_identities_never_mix(
    client: SyncPrefectClient, flow_run_ids: dict[Path, UUID], first: Path, namesake: Path
) -> None:
    """``x/demo`` and ``x/sweep/demo`` share no artifact key, tag, limit name or event label;
    each experiment's evaluation limit was removed once its final checkpoint was evaluated."""
    names = {d: experiment_of(str(d)) for d in (first, namesake)}
    assert names[first] != names[namesake]
    assert names[first].startswith("demo-") and names[namesake].startswith("demo-")
    keys, tags = {}, {}
    for directory in (first, namesake):
        run_ids = [flow_run_ids[directory]] + [
            r.id
            for r in client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    tags=FlowRunFilterTags(all_=[f"experiment:{names[directory]}"])
                )
            )
        ]
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=run_ids))
        )
        keys[directory] = {a.key for a in artifacts if a.key}
        tags[directory] = {
            tag
            for run_id in run_ids
            for tag in client.read_flow_run(run_id).tags
            if tag.startswith("experiment:")
        }
        assert tags[directory] == {f"experiment:{names[directory]}"}
        assert f"eval-summary-validation-{names[directory]}" in keys[directory]
    assert not keys[first] & keys[namesake], keys[first] & keys[namesake]
    limits = {d: evaluation_limit_name(names[d], "validation") for d in (first, namesake)}
    assert limits[first] != limits[namesake]
    existing = {limit.name for limit in client.read_global_concurrency_limits(limit=200)}
    assert not existing & set(limits.values()), existing  # removed with their experiments
    for directory in (first, namesake):
        events = client.read_events(
            filter=EventFilter(
                event=EventNameFilter(name=["tml.checkpoint.committed"]),
                resource=EventResourceFilter(
                    labels=ResourceSpecification({"tml.save_dir": str(directory)})
                ),
            ),
            limit=50,
        ).events
        assert events and {e.resource["tml.experiment"] for e in events} == {names[directory]}
        # The newest summary of the burst is right: everything evaluated, nothing pending.
        (summary,) = client.read_latest_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[f"eval-summary-validation-{names[directory]}"])
            )
        )
        assert "Reached the final checkpoint: True (final step 4)" in str(summary.data)
        assert "Evaluated 2 of 2 committed checkpoints; pending: none" in str(summary.data)


def check_comparison(client: SyncPrefectClient, first: Path, other_lr: Path) -> None:
    """One table compares the runs under ``x/``: each with its learning rate, best checkpoint
    and evaluation losses (the namesake under ``x/sweep/`` is another root's)."""
    key = f"compare-{derived_experiment(str(first.parent))}"
    (found,) = client.read_latest_artifacts(
        artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
    )
    table = json.loads(found.data) if isinstance(found.data, str) else found.data
    rows = {row["run"]: row for row in table}
    assert set(rows) == {"demo", "demo-lr"}
    for directory, lr in ((first, 1e-3), (other_lr, 0.05)):
        row = rows[directory.name]
        assert row["lr"] == pytest.approx(lr)
        losses = {
            step: read_checkpoint_metrics(f"{directory}/{step}", partition="validation")["loss"]
            for step in (2, 4)
        }
        best = min(losses, key=lambda step: (losses[step], step))
        assert (row["best step"], row["best checkpoint"]) == (best, f"{directory}/{best}")
        assert row["best eval loss"] == pytest.approx(losses[best], abs=1e-5)
        assert row["final eval loss"] == pytest.approx(losses[4], abs=1e-5)
    curves = client.read_latest_artifacts(
        artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key.replace("compare-", "compare-curves-", 1)])
        )
    )
    assert curves and "data:image/png;base64," in str(curves[0].data)


def report_commit_to_metrics_latency(save_dirs: list[Path]) -> None:
    """Commit -> evaluation metrics on disk, per checkpoint (reported, not asserted: the
    figure is a benchmark's, benchmarks/bench_eval_latency.py; here the three runs and their
    evaluations share two cores)."""
    latencies = []
    for save_dir in save_dirs:
        for checkpoint in get_checkpoints(str(save_dir)):
            committed = Path(checkpoint, COMMIT_MARKER).stat().st_mtime
            evaluated = Path(metrics_path(checkpoint, "validation")).stat().st_mtime
            assert evaluated >= committed
            latencies.append(evaluated - committed)
    print(
        f"commit -> metrics on disk over {len(latencies)} checkpoints of 3 concurrent runs: "
        f"median {statistics.median(latencies):.1f} s, max {max(latencies):.1f} s"
    )


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
        run = check_train_run(client, flow_run_id, save_dir, worker_log)
        # Flow retries set by the deployment's job variables reached the flow run.
        assert run.empirical_policy.retries == 1

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
    """Each committed checkpoint's event started an evaluate run by itself, through the named
    trigger, with the event's and the train run's ids; one run evaluated every checkpoint
    (exactly once, one model) and is named after them, the other says which run did its
    checkpoint; the table shows the metrics, and ``tml.checkpoint.evaluated`` links each
    evaluation to its runs."""
    evaluate = client.read_deployment_by_name("evaluate/evaluate")
    assert evaluate.global_concurrency_limit is not None
    assert evaluate.global_concurrency_limit.limit == 2  # processes a burst may start at once
    (trigger,) = client.read_automations_by_name("tml: evaluate new checkpoints")
    assert "tml.checkpoint.committed" in trigger.description
    checkpoints = get_checkpoints(str(save_dir))
    assert checkpoints == [f"{save_dir}/2", f"{save_dir}/4"]
    experiment = experiment_of(str(save_dir))

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
        assert run.parameters["experiment"] == experiment
        assert UUID(run.parameters["event_id"])
        trained_by = client.read_flow_run(UUID(run.parameters["train_flow_run_id"]))
        assert trained_by.name.startswith("train · "), trained_by.name
    assert sorted(r.parameters["checkpoint"] for r in runs) == checkpoints

    prefix = f"evaluate · {experiment} · validation · "
    (evaluator,) = [r for r in runs if r.name == prefix + "steps 2\u20134"]
    (other,) = [r for r in runs if r is not evaluator]
    step = other.parameters["checkpoint"].rsplit("/", 1)[-1]
    said = f'nothing to do: step {step} was evaluated by "step'  # "steps 2-4" or "step 2"
    assert other.name.startswith(prefix + said), other.name  # its name when it was asked
    assert other.state is not None and other.state.message == other.name.removeprefix(
        f"evaluate · {experiment} · "
    )

    task_runs = client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id for r in runs]))
    )
    evaluated = Counter(
        (t.name, t.flow_run_id) for t in task_runs if t.state and t.state.name == "Completed"
    )
    assert evaluated == {
        ("validation-step-2", evaluator.id): 1,
        ("validation-step-4", evaluator.id): 1,
    }, task_runs
    assert all(is_done_eval(c, "validation") for c in checkpoints)

    table = client.read_latest_artifacts(
        artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"checkpoints-{experiment}"]))
    )
    rows = json.loads(table[0].data) if isinstance(table[0].data, str) else table[0].data
    assert [(row["step"], row["validation/loss"] is not None) for row in rows] == [
        (2, True),
        (4, True),
    ]
    events = poll(
        lambda: (
            client.read_events(
                filter=EventFilter(
                    event=EventNameFilter(name=["tml.checkpoint.evaluated"]),
                    resource=EventResourceFilter(
                        labels=ResourceSpecification({"tml.save_dir": str(save_dir)})
                    ),
                ),
                limit=50,  # the client's default (100) is over the server's maximum
            ).events
        ),
        lambda found: len(found) == len(checkpoints),
        "tml.checkpoint.evaluated of each checkpoint",
    )
    for event in events:
        roles = {r.role: r.id for r in event.related}
        assert roles["evaluator"] == f"prefect.flow-run.{evaluator.id}"
        assert roles["train"].startswith("prefect.flow-run.")
        assert roles["trigger"].startswith("prefect.event.")
