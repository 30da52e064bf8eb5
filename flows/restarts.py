"""Training runs that come back by themselves: what a restarted ``train`` run does first, and
the final state of a preempted one.

Why: Prefect retries a *Failed* flow run, never a *Crashed* one (its process died: an
out-of-memory kill, a lost machine, a preemption). The automations in ``automations.yaml``
close that gap with Prefect's own parts: one marks a run whose heartbeats stopped Crashed,
the other runs the deployment of a Crashed or preempted ``train`` run again with the same
parameters plus ``restart_of`` (:class:`training.config.RestartOf`: the run it resumes, and
this restart's number in the lineage). The new run then resumes from the newest valid
checkpoint like any run. This module holds the three things only the new run can do:

* say, in its first log line, which run it resumes and why, with a link;
* stop the lineage after ``TrainOptions.max_restarts`` restarts (a model that dies at every
  start must not loop forever): the run ends ``Cancelled`` named ``NotRestarted``, a state the
  automations neither retry nor resume, with a message saying what to do;
* set the dead attempt's task runs that still say Running (nobody will ever finish them) to
  Crashed, naming the run that resumes their work, so no ghost stays Running in the UI.

Every API call here is best effort: a run is never failed because its bookkeeping failed.
"""

from __future__ import annotations

import logging
from typing import Any
from uuid import UUID

from prefect import get_run_logger
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    TaskRunFilter,
    TaskRunFilterState,
    TaskRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, State, StateType
from prefect.runtime import flow_run
from prefect.states import Cancelled, Crashed
from prefect.utilities.urls import url_for

from tml_checkpointing import CheckpointError, get_checkpoint, step_from_checkpoint
from tml_checkpointing.errors import PreemptedError
from training.config import RestartOf, TrainConfig, TrainOptions

NOT_RESTARTED = "NotRestarted"  # the state name of a run stopped by max_restarts
PREEMPTED = "Preempted"  # the state name of a run stopped by SIGTERM/SIGINT/SIGUSR1
UNFINISHED = (StateType.RUNNING, StateType.PENDING)  # task runs a dead process leaves behind


def begin_restart(restart_of: RestartOf | None, options: TrainOptions) -> State[Any] | None:
    """The first thing a ``train`` run does. Returns the state to end with at once when the
    lineage has used up its restarts; ``None`` to go on."""
    this_run = flow_run.get_id()
    if restart_of is None:
        if this_run and (flow_run.run_count or 1) > 1:  # a retry of this very run (UI "Retry")
            _crash_ghost_task_runs([UUID(this_run)], this_run)
        return None
    logger = get_run_logger()
    resumed = _read_flow_run(restart_of.flow_run_id)
    described = _describe(resumed, restart_of.flow_run_id)
    if restart_of.number > options.max_restarts:
        message = (
            f"not restarted: {described} crashed, and its lineage already had "
            f"{restart_of.number - 1} automatic restarts (max_restarts={options.max_restarts}). "
            "Find the cause in its logs, then run the deployment again: it resumes from the "
            "newest valid checkpoint."
        )
        logger.error("%s", message)
        return Cancelled(name=NOT_RESTARTED, message=message)
    logger.warning(
        "Restart %s of at most %s: resuming %s from the newest valid checkpoint.",
        restart_of.number,
        options.max_restarts,
        described,
    )
    ids = [restart_of.flow_run_id] + ([UUID(this_run)] if (flow_run.run_count or 1) > 1 else [])
    _crash_ghost_task_runs(ids, this_run or "?")
    return None


def preempted_state(preempted: PreemptedError, config: TrainConfig) -> State[Any]:
    """The final state of a run stopped by a signal after its final checkpoint.

    ``Crashed`` named ``Preempted`` (the resume automation expects it), with where the run
    stands; ``Cancelled`` when a person cancelled the run (the worker's SIGTERM is how a
    cancellation reaches the process), so that a cancellation is never resumed. The state
    carries the error: a caller of the flow (``tml train``) gets it raised.
    """
    where = _where(preempted, config)
    if _is_cancelling():
        return Cancelled(message=f"Cancelled during training: {where}.")
    return Crashed(
        name=PREEMPTED,
        message=f"Preempted by {preempted.signal_name}: {where}; a restart resumes from it.",
        data=preempted,
    )


def _where(preempted: PreemptedError, config: TrainConfig) -> str:
    """Where the run's checkpoint is: the step the process saved on the signal, or (ranks
    save it in their own processes) the newest committed one."""
    if preempted.step is not None:
        return f"step {preempted.step} is committed in {config.save_dir}"
    try:
        newest = get_checkpoint(
            config.save_dir, missing_ok=True, storage_options=config.storage_options
        )
    except CheckpointError as error:
        return f"{config.save_dir} could not be listed ({error})"
    if not newest:
        return f"no checkpoint is committed in {config.save_dir} yet"
    return f"step {step_from_checkpoint(newest)} is committed in {config.save_dir}"


def _describe(run: FlowRun | None, run_id: UUID) -> str:
    if run is None:
        return f"flow run {run_id} (not readable)"
    state = f"{run.state.name}: {run.state.message}" if run.state else "no state"
    link = url_for("flow-run", obj_id=run.id)
    return f"flow run {run.name!r} ({link or run.id}; it ended {state})"


def _read_flow_run(run_id: UUID) -> FlowRun | None:
    try:
        with get_client(sync_client=True) as client:
            return client.read_flow_run(run_id)
    except Exception as error:  # bookkeeping: the API is the only thing that can fail
        logging.getLogger(__name__).warning("Could not read flow run %s: %s", run_id, error)
        return None


def _is_cancelling() -> bool:
    this_run = flow_run.get_id()
    if not this_run:
        return False
    run = _read_flow_run(UUID(this_run))
    return run is not None and run.state is not None and run.state.type == StateType.CANCELLING


def _crash_ghost_task_runs(flow_run_ids: list[UUID], resumed_by: str) -> None:
    """Set the still-Running task runs of dead attempts to Crashed (no attempt of this run
    has started a task yet: every Running one belongs to a process that is gone)."""
    logger = get_run_logger()
    name = flow_run.get_name() or resumed_by
    try:
        with get_client(sync_client=True) as client:
            ghosts = _unfinished_task_runs(client, flow_run_ids)
            for ghost in ghosts:
                client.set_task_run_state(
                    ghost.id,
                    Crashed(
                        message=f"Its process died; flow run {name!r} ({resumed_by}) resumes "
                        "this work from the newest checkpoint."
                    ),
                    force=True,
                )
                logger.warning("Task run %r of the dead attempt set to Crashed.", ghost.name)
    except Exception as error:
        logger.warning("Task runs of the dead attempt not updated: %s", error)


def _unfinished_task_runs(client: SyncPrefectClient, flow_run_ids: list[UUID]) -> list[Any]:
    return client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids)),
        task_run_filter=TaskRunFilter(
            state=TaskRunFilterState(type=TaskRunFilterStateType(any_=list(UNFINISHED)))
        ),
    )
