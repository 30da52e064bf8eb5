"""automations.yaml, rendered the way Prefect's server renders it (in seconds, no server).

The deployment tests (test_deployment_recovery.py) prove the automations end to end; these
catch a template that renders wrong before a five-minute run does: Prefect appends
``| tojson`` to a single-expression template, which binds to the last operand of an
unparenthesised one (``x + 1 | tojson`` adds a string to a number).
"""

from __future__ import annotations

import copy
from typing import Any
from uuid import UUID, uuid4

import pytest
from prefect.events.actions import ChangeFlowRunState, RunDeployment
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.server.events.actions import RunDeployment as ServerRunDeployment
from prefect.utilities.schema_tools.hydration import HydrationContext, hydrate

from flows.automations import load
from training.config import RestartOf, TrainConfig, TrainOptions


class CrashedRun:
    """What the server's template context calls ``flow_run``: the run the event is about."""

    def __init__(self, parameters: dict[str, Any]) -> None:
        self.id = uuid4()
        self.parameters = parameters


def render(action: RunDeployment, run: CrashedRun) -> dict[str, Any]:
    parameters = copy.deepcopy(action.parameters or {})
    ServerRunDeployment._upgrade_v1_templates(parameters)
    rendered: dict[str, Any] = hydrate(
        parameters,
        HydrationContext(raise_on_error=True, render_jinja=True, jinja_context={"flow_run": run}),
    )
    return rendered


def resume_action() -> RunDeployment:
    (automation,) = [a for a in load() if a.name == "tml: resume crashed training runs"]
    (action,) = automation.actions
    assert isinstance(action, RunDeployment) and action.source == "inferred"
    return action


CONFIG = {"save_dir": "s3://bucket/exp1", "epochs": 5, "recipe": "recipes.torchrec_ranking:build"}


@pytest.mark.parametrize(
    "parameters, number",
    [
        ({"config": CONFIG}, 1),  # the train deployment: options left to the model
        ({"config": CONFIG, "options": {"node_rank": 0, "rdzv_endpoint": None}}, 1),
        (
            {"config": CONFIG, "restart_of": {"flow_run_id": str(uuid4()), "number": 2}},
            3,
        ),
    ],
)
def test_a_restart_keeps_the_parameters_and_counts_the_lineage(
    parameters: dict[str, Any], number: int
) -> None:
    crashed = CrashedRun(parameters)
    rendered = render(resume_action(), crashed)
    assert rendered["config"] == CONFIG
    assert TrainConfig.model_validate(rendered["config"]).save_dir == CONFIG["save_dir"]
    assert rendered["options"] == parameters.get("options", {})
    TrainOptions.model_validate(rendered["options"])
    restart = RestartOf.model_validate(rendered["restart_of"])
    assert restart == RestartOf(flow_run_id=UUID(str(crashed.id)), number=number)


def test_silent_runs_are_marked_crashed_after_three_missed_heartbeats() -> None:
    """Only runs of this project's deployments (30 s heartbeats, prefect.yaml), so that a
    `tml train` run (Prefect's 180 s default) is never declared dead while alive."""
    (automation,) = [a for a in load() if a.name == "tml: mark silent training runs Crashed"]
    trigger = automation.trigger
    assert isinstance(trigger, EventTrigger) and trigger.posture == Posture.Proactive
    assert trigger.within.total_seconds() == 90
    assert trigger.after == {"prefect.flow-run.heartbeat"}
    related = trigger.match_related if isinstance(trigger.match_related, list) else []
    roles = {spec.root.get("prefect.resource.role") for spec in related}
    assert roles == {"flow", "deployment", "tag"}
    (action,) = automation.actions
    assert isinstance(action, ChangeFlowRunState) and action.state.value == "CRASHED"
