"""A retried flow run clears its dead attempt's ghosts (flows/restarts.py), in-process.

The automation's restarts are proven end to end in test_deployment_recovery.py. A person's
**Retry** of a crashed run is another path: the same flow run starts again (run_count 2), and
the task runs its dead first attempt left Running must be set to Crashed before it trains.
"""

from __future__ import annotations

from uuid import UUID

from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.runtime import flow_run
from prefect.states import Running

from flows.restarts import begin_restart
from training.config import TrainOptions

from .conftest import PrefectServer


@task
def epoch() -> None:
    """Stands for the epoch task a killed process left Running."""


def test_a_retried_run_sets_its_dead_attempts_running_task_runs_crashed(
    prefect_api: PrefectServer,
) -> None:
    ghosts: list[UUID] = []

    @flow(retries=1, retry_delay_seconds=0)
    def attempt() -> None:
        run_id = UUID(str(flow_run.get_id()))
        if (flow_run.run_count or 1) == 1:  # the first attempt dies inside its epoch
            with get_client(sync_client=True) as client:
                ghost = client.create_task_run(
                    epoch, flow_run_id=run_id, dynamic_key="0", state=Running()
                )
            ghosts.append(ghost.id)
            raise RuntimeError("the process died here")
        assert begin_restart(None, TrainOptions()) is None  # a retry, not a restart: go on

    state = attempt(return_state=True)
    assert state.type == StateType.COMPLETED
    with get_client(sync_client=True) as client:
        ghost_state = client.read_task_run(ghosts[0]).state
    assert ghost_state is not None and ghost_state.type == StateType.CRASHED, ghost_state
    assert ghost_state.message is not None and "Its process died" in ghost_state.message
