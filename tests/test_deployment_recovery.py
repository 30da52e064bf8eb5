"""Deployed training runs come back by themselves (automations.yaml, on a real server).

Each test deploys ``prefect.yaml`` as a user does (the work pool, ``prefect deploy --all``,
whose build step applies automations.yaml), runs the ``train`` deployment with a process
worker started elsewhere, and ends the flow-run process at a moment that process reported:
the run's own job variables put tests/helpers/deployed_hooks on its ``PYTHONPATH``, whose
``sitecustomize`` reports the library's events to a file and pauses or dies on one. The
automation's restarts use the deployment's job variables, so they run plainly.

* SIGKILL of the flow-run process (what an out-of-memory kill does): the worker reports the
  run Crashed, "tml: resume crashed training runs" runs the deployment again with
  ``restart_of``, and that run resumes from the newest checkpoint and ends bit-identical to
  an uninterrupted run, with no task run left Running.
* SIGTERM (a preemption): the run ends Crashed *named Preempted*, saying where its checkpoint
  is, and is resumed the same way.
* The worker killed with its flow-run process (a lost machine): heartbeats stop, "tml: mark
  silent training runs Crashed" marks the run within its 90 s, and the run resumes once a
  worker is back.
* A deployment whose runs die at every start: restarts stop at ``max_restarts`` (3), and the
  run after them ends ``NotRestarted`` without training.

Timings (kill → Crashed → restart created → its epoch task started, where it restores and
trains on → restart finished) are printed (``pytest -s``) and appended to
``$TML_RECOVERY_TIMINGS`` when set: figures for notes, never asserted beyond generous bounds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import LogSort
from prefect.settings import PREFECT_API_URL, temporary_settings

from tml_checkpointing import get_checkpoints, step_from_checkpoint
from training.config import TrainConfig

from .conftest import PrefectServer
from .helpers.deployed import (
    HOOKS,
    REPO_ROOT,
    cli_env,
    deploy_all,
    kill_tree,
    poll,
    prefect,
    remove_project_automations,
    run_deployment,
    start_worker,
)
from .training_helpers import assert_bit_identical, checkpoint_tensors, plain_run

PARAMS: dict[str, Any] = {
    "epochs": 3,
    "steps_per_epoch": 4,
    "batch_size": 32,
    "seed": 5,
    "checkpoint_every_steps": 2,
}
HEARTBEAT_TIMEOUT_S = 90  # automations.yaml: "tml: mark silent training runs Crashed"


@pytest.fixture(scope="module")
def deployed(prefect_server: PrefectServer) -> Iterator[dict[str, str]]:
    """prefect.yaml deployed once for the module; its automations removed afterwards."""
    env = cli_env(prefect_server)
    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}):
        deploy_all(env)
        with get_client(sync_client=True) as client:  # evaluations: not what is tested here
            evaluate = client.read_deployment_by_name("evaluate/evaluate")
            client.delete_resource_owned_automations(f"prefect.deployment.{evaluate.id}")
        try:
            yield env
        finally:
            remove_project_automations()


StartWorker = Callable[[], "subprocess.Popen[str]"]


@pytest.fixture
def workers(deployed: dict[str, str], tmp_path: Path) -> Iterator[StartWorker]:
    """Starts a process worker of the pool (from a directory of its own) on each call; every
    one started, and every flow-run process it started, is killed after the test."""
    started: list[subprocess.Popen[str]] = []

    def start() -> subprocess.Popen[str]:
        log = tmp_path / f"worker-{len(started)}.log"
        started.append(start_worker(deployed, tmp_path / "worker-cwd", log))
        return started[-1]

    yield start
    for worker in started:
        kill_tree(worker)


@dataclass
class Timeline:
    """Seconds from the kill to each step of the recovery."""

    case: str
    marks: dict[str, float]

    def report(self) -> None:
        line = json.dumps({"case": self.case, **{k: round(v, 1) for k, v in self.marks.items()}})
        print(f"recovery timings: {line}")
        if path := os.environ.get("TML_RECOVERY_TIMINGS"):
            with open(path, "a") as out:
                out.write(line + "\n")


def hook_env(events: Path, **settings: str) -> str:
    """``env=...`` job variables that load the reporter into this run's flow-run process."""
    variables = {
        "PYTHONPATH": f"{HOOKS}{os.pathsep}{REPO_ROOT}",
        "TML_TEST_EVENTS_FILE": str(events),
        **{f"TML_TEST_{key.upper()}": value for key, value in settings.items()},
    }
    return "env=" + json.dumps(variables)


def start_train(env: dict[str, str], save_dir: Path, *job_variables: str, **params: Any) -> UUID:
    config = json.dumps({"save_dir": str(save_dir), **PARAMS, **params})
    extra = [arg for variable in job_variables for arg in ("--job-variable", variable)]
    return run_deployment(env, "train/train", "--param", f"config={config}", *extra)


def wait_for_line(path: Path, prefix: str, limit_s: float = 180) -> str:
    """The first line of ``path`` starting with ``prefix``, written by the flow-run process."""
    return poll(
        lambda: next(
            (line for line in _lines(path) if line.startswith(prefix)),
            "",
        ),
        bool,
        f"line {prefix!r} in {path}",
        limit_s=limit_s,
    )


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def restarts_of(client: SyncPrefectClient, run_id: UUID) -> list[FlowRun]:
    """Runs whose ``restart_of`` names ``run_id`` (what the resume automation started)."""
    runs = client.read_flow_runs(
        deployment_filter=DeploymentFilter(
            id=DeploymentFilterId(any_=[client.read_flow_run(run_id).deployment_id])
        )
    )
    return [
        run
        for run in runs
        if (run.parameters.get("restart_of") or {}).get("flow_run_id") == str(run_id)
    ]


def final(client: SyncPrefectClient, run_id: UUID, what: str, limit_s: float = 240) -> FlowRun:
    return poll(
        lambda: client.read_flow_run(run_id),
        lambda run: run.state is not None and run.state.is_final(),
        what,
        limit_s=limit_s,
    )


def the_restart(client: SyncPrefectClient, run_id: UUID, limit_s: float = 240) -> FlowRun:
    """The one run resuming ``run_id``, once it has ended."""
    runs = poll(
        lambda: restarts_of(client, run_id),
        lambda runs: len(runs) == 1 and runs[0].state is not None and runs[0].state.is_final(),
        f"the restart of {run_id}, finished",
        limit_s=limit_s,
    )
    return runs[0]


def since(start: float, moment: datetime | None) -> float:
    assert moment is not None
    return moment.timestamp() - start


def check_resumed(
    client: SyncPrefectClient,
    crashed: FlowRun,
    resumed: FlowRun,
    save_dir: Path,
    step: int,
    *,
    took_over_lock: bool,
) -> None:
    """The restart ran the same config, says in its first line which run it resumes, left
    no task run of either run Running, and trained on from ``step``; when the dead process
    held the writer lock, the takeover is in the restart's own logs (not only the worker's)."""
    assert resumed.state is not None
    assert resumed.state.type == StateType.COMPLETED, resumed.state
    assert resumed.created_by is not None and resumed.created_by.type == "AUTOMATION"
    assert resumed.parameters["config"] == crashed.parameters["config"]
    assert resumed.parameters["restart_of"] == {"flow_run_id": str(crashed.id), "number": 1}
    assert resumed.name.endswith(" · restart 1"), resumed.name

    messages = [
        log.message
        for log in client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[resumed.id])),
            sort=LogSort.TIMESTAMP_ASC,
        )
    ]
    announced = next(i for i, m in enumerate(messages) if m.startswith("Restart 1 of at most 3"))
    assert crashed.name in messages[announced] and str(crashed.id) in messages[announced]
    resuming = next(i for i, m in enumerate(messages) if f"resuming from {save_dir}/" in m)
    assert announced < resuming, messages  # the flow's first line, before anything it does
    assert messages[resuming].endswith(f"resuming from {save_dir}/{step}"), messages[resuming]
    takeovers = [m for m in messages if m.startswith("Took over the stale writer lock")]
    assert len(takeovers) == (1 if took_over_lock else 0), messages

    task_runs = client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[crashed.id, resumed.id]))
    )
    states = {(t.flow_run_id, t.name): t.state for t in task_runs}
    assert all(s is not None and s.is_final() for s in states.values()), states


def crashed_task_run_messages(client: SyncPrefectClient, run: FlowRun) -> list[str]:
    task_runs = client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
    )
    return [t.state.message or "" for t in task_runs if t.state and t.state.is_crashed()]


def assert_same_as_uninterrupted(save_dir: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    plain_run(TrainConfig(save_dir=str(reference), **PARAMS))
    final_step = PARAMS["epochs"] * PARAMS["steps_per_epoch"]
    assert step_from_checkpoint(get_checkpoints(str(save_dir))[-1]) == final_step
    assert_bit_identical(
        checkpoint_tensors(str(save_dir), final_step), checkpoint_tensors(str(reference))
    )


@pytest.mark.timeout(480)
def test_killed_flow_run_process_resumes_by_itself(
    deployed: dict[str, str], workers: StartWorker, prefect_api: PrefectServer, tmp_path: Path
) -> None:
    save_dir = tmp_path / "run"
    events = tmp_path / "events.log"
    run_id = start_train(deployed, save_dir, hook_env(events, pause="save.committed:3"))
    workers()
    pid = int(wait_for_line(events, "pid ").split()[1])
    paused = wait_for_line(events, "paused save.committed ").split()[-1]
    # Where the kill lands: the third commit is the newest checkpoint, nothing after it.
    step = step_from_checkpoint(paused)
    assert step == 6
    assert step_from_checkpoint(get_checkpoints(str(save_dir))[-1]) == step
    killed = time.time()
    os.kill(pid, signal.SIGKILL)

    with get_client(sync_client=True) as client:
        crashed = final(client, run_id, "the killed run, Crashed")
        assert crashed.state is not None and crashed.state.name == "Crashed", crashed.state
        resumed = the_restart(client, run_id)
        check_resumed(client, crashed, resumed, save_dir, step, took_over_lock=True)
        # The dead attempt's epoch task said Running: now Crashed, naming its resumer.
        ghosts = crashed_task_run_messages(client, crashed)
        assert ghosts and all(resumed.name in m for m in ghosts), ghosts
        Timeline("flow-run process SIGKILLed", _marks(client, killed, crashed, resumed)).report()
    assert_same_as_uninterrupted(save_dir, tmp_path)


@pytest.mark.timeout(480)
def test_preempted_run_ends_preempted_and_resumes(
    deployed: dict[str, str], workers: StartWorker, prefect_api: PrefectServer, tmp_path: Path
) -> None:
    save_dir = tmp_path / "run"
    events = tmp_path / "events.log"
    run_id = start_train(deployed, save_dir, hook_env(events))
    workers()
    pid = int(wait_for_line(events, "pid ").split()[1])
    wait_for_line(events, f"event save.committed {save_dir}/4")
    killed = time.time()
    os.kill(pid, signal.SIGTERM)  # after the reported commit of step 4, mid-training

    with get_client(sync_client=True) as client:
        preempted = final(client, run_id, "the preempted run, final")
        state = preempted.state
        assert state is not None
        assert (state.type, state.name) == (StateType.CRASHED, "Preempted"), state
        # Where its checkpoint is: the step the process wrote on the signal, committed.
        assert state.message is not None and state.message.startswith("Preempted by SIGTERM")
        stopped_at = int(state.message.split("step ")[1].split()[0])
        assert stopped_at >= 4
        assert step_from_checkpoint(get_checkpoints(str(save_dir))[-1]) == stopped_at
        assert f"is committed in {save_dir}" in state.message
        resumed = the_restart(client, run_id)
        check_resumed(client, preempted, resumed, save_dir, stopped_at, took_over_lock=False)
        Timeline("SIGTERM (preempted)", _marks(client, killed, preempted, resumed)).report()
    assert_same_as_uninterrupted(save_dir, tmp_path)


@pytest.mark.timeout(480)
def test_cancelled_run_ends_cancelled_and_is_not_resumed(
    deployed: dict[str, str], workers: StartWorker, prefect_api: PrefectServer, tmp_path: Path
) -> None:
    """A cancellation reaches the process as the worker's SIGTERM, like a preemption: the run
    must end Cancelled (its step checkpointed), and nothing may start it again."""
    save_dir = tmp_path / "run"
    events = tmp_path / "events.log"
    # Long enough to be cancelled while it trains: 60 steps, 0.5 s in each of 30 saves.
    run_id = start_train(
        deployed, save_dir, hook_env(events, slow="save.started:0.5"), steps_per_epoch=20
    )
    workers()
    wait_for_line(events, f"event save.committed {save_dir}/4")
    prefect(["flow-run", "cancel", str(run_id)], deployed)  # as a person would
    with get_client(sync_client=True) as client:
        cancelled = final(client, run_id, "the cancelled run, final")
        state = cancelled.state
        assert state is not None and state.type == StateType.CANCELLED, state
        assert state.message is not None and "is committed in" in state.message, state
        stopped_at = int(state.message.split("step ")[1].split()[0])
        assert step_from_checkpoint(get_checkpoints(str(save_dir))[-1]) == stopped_at
        # Absence has no event to await: the resume automation acts within a second of a
        # Crashed event (the tests above: 0.4-2.9 s); ten seconds without a restart.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert not restarts_of(client, run_id)
            time.sleep(0.5)


@pytest.mark.timeout(600)
def test_lost_worker_run_is_marked_crashed_and_resumed_once_a_worker_is_back(
    deployed: dict[str, str], workers: StartWorker, prefect_api: PrefectServer, tmp_path: Path
) -> None:
    save_dir = tmp_path / "run"
    events = tmp_path / "events.log"
    run_id = start_train(deployed, save_dir, hook_env(events, pause="save.committed:2"))
    worker = workers()
    wait_for_line(events, "paused save.committed ")
    step = step_from_checkpoint(get_checkpoints(str(save_dir))[-1])
    killed = time.time()
    kill_tree(worker)  # the machine is gone: worker and flow-run process, no report
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(run_id).state.type == StateType.RUNNING  # type: ignore[union-attr]
        crashed = final(client, run_id, "the silent run, marked Crashed", limit_s=240)
        state = crashed.state
        assert state is not None and state.type == StateType.CRASHED, state
        assert state.message is not None and state.message.startswith("No heartbeat for 90 s")
        # 90 s after its last heartbeat (≤ 30 s before the kill), plus the automation's
        # evaluation: a bound, not a benchmark.
        assert since(killed, state.timestamp) < HEARTBEAT_TIMEOUT_S + 60
        workers()  # a worker is back
        back = time.time()
        resumed = the_restart(client, run_id)
        check_resumed(client, crashed, resumed, save_dir, step, took_over_lock=True)
        marks = _marks(client, killed, crashed, resumed)
        marks["worker back"] = back - killed
        Timeline("worker and flow-run process SIGKILLed", marks).report()
    assert_same_as_uninterrupted(save_dir, tmp_path)


@pytest.mark.timeout(600)
def test_run_dying_at_every_start_stops_after_max_restarts(
    deployed: dict[str, str], workers: StartWorker, prefect_api: PrefectServer, tmp_path: Path
) -> None:
    """A copy of the train deployment whose runs SIGKILL themselves at their first save."""
    save_dir = tmp_path / "run"
    with get_client(sync_client=True) as client:
        train = client.read_deployment_by_name("train/train")
        variables = dict(train.job_variables or {})
        variables["env"] = {
            **variables.get("env", {}),
            "PYTHONPATH": f"{HOOKS}{os.pathsep}{REPO_ROOT}",
            "TML_TEST_DIE_AT": "save.started",
        }
        deployment_id = client.create_deployment(
            flow_id=train.flow_id,
            name="dies-at-every-start",
            entrypoint=train.entrypoint,
            path=train.path,
            pull_steps=train.pull_steps,
            work_pool_name=train.work_pool_name,
            job_variables=variables,
            parameters={"config": {"save_dir": str(save_dir), **PARAMS}},
            parameter_openapi_schema=train.parameter_openapi_schema,
            tags=train.tags,
        )
        first = client.create_flow_run_from_deployment(deployment_id).id
    workers()
    with get_client(sync_client=True) as client:
        lineage = [final(client, first, "the first run")]
        while len(lineage) <= 4:
            lineage.append(the_restart(client, lineage[-1].id))
        states = [(r.state.type, r.state.name) for r in lineage if r.state]
        assert states == [(StateType.CRASHED, "Crashed")] * 4 + [
            (StateType.CANCELLED, "NotRestarted")
        ], states
        assert [(r.parameters.get("restart_of") or {}).get("number") for r in lineage] == [
            None,
            1,
            2,
            3,
            4,
        ]
        last = lineage[-1].state
        assert last is not None and last.message is not None
        assert "3 automatic restarts (max_restarts=3)" in last.message
        assert not restarts_of(client, lineage[-1].id)  # nothing resumes NotRestarted
    assert get_checkpoints(str(save_dir)) == []  # each start died before its first commit


def _marks(
    client: SyncPrefectClient, killed: float, crashed: FlowRun, resumed: FlowRun
) -> dict[str, float]:
    """kill → the run's end state → the restart created → its epoch task started (training
    restores and resumes there) → its first checkpoint committed."""
    assert crashed.state is not None
    task_runs = client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[resumed.id]))
    )
    trained = [t for t in task_runs if t.state and t.state.name == "Completed" and t.start_time]
    started = min(t.start_time for t in trained if t.start_time)
    return {
        "crashed": since(killed, crashed.state.timestamp),
        "restart created": since(killed, resumed.created),
        "resumed epoch started": since(killed, started),
        "restart finished": since(killed, resumed.end_time),
    }
