"""What connects an evaluate run to the rest: the event that started it, the training run it
serves, who evaluated a checkpoint, and the ``tml.checkpoint.evaluated`` event.

Why: an event-started evaluate run was "A custom trigger" and a random-looking name; nothing on
its page led back to the commit that started it or to the training run, and a run that found
its checkpoint done could not say which run had done it. Here:

- :func:`log_trigger` writes the run's first log line with UI links to the triggering
  ``tml.checkpoint.committed`` event and to the train flow run (the trigger passes
  ``{{ event.id }}`` and ``{{ event.payload.flow_run_id }}``);
- :func:`announce_evaluated` emits ``tml.checkpoint.evaluated`` (resource: the checkpoint;
  related: the train flow run, this evaluate flow run, the triggering event), so the Events
  page shows commit and evaluation of a checkpoint side by side, each linked to its runs;
- :func:`who_evaluated` asks Prefect which flow run evaluated a step: the Completed (not
  "Skipped") task run ``<partition>-step-<n>`` of the ``evaluate-checkpoint`` task in a flow run
  tagged with the experiment (task run names repeat across experiments; the tag does not).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterTags,
    TaskRunFilter,
    TaskRunFilterName,
    TaskRunFilterState,
    TaskRunFilterStateName,
)
from prefect.client.schemas.sorting import TaskRunSort
from prefect.events import emit_event
from prefect.events.filters import EventFilter, EventIDFilter
from prefect.runtime import flow_run
from prefect.settings import PREFECT_UI_URL

from tasks.naming import EXPERIMENT_TAG

logger = logging.getLogger(__name__)

EVALUATED = "tml.checkpoint.evaluated"


def task_run_name(partition: str, step: int) -> str:
    """The evaluate-checkpoint task run's name (its ``task_run_name`` template)."""
    return f"{partition}-step-{step}"


def _uuid(value: str | None) -> UUID | None:
    try:
        return UUID(value) if value else None
    except ValueError:
        return None


def ui_url(path: str) -> str | None:
    """``<PREFECT_UI_URL>/<path>``, or ``None`` when no UI is known (no server)."""
    base = PREFECT_UI_URL.value()
    return f"{str(base).rstrip('/')}/{path}" if base else None


def log_trigger(
    log: Any, checkpoint: str, event_id: str | None, train_flow_run_id: str | None
) -> None:
    """The run's first line: which commit event started it, for which training run (links)."""
    event = _uuid(event_id)
    train_run = _uuid(train_flow_run_id)
    if event is None and train_run is None:
        log.info("Started for %s (no triggering event).", checkpoint)
        return
    occurred = datetime.now(UTC)
    train_name = "?"
    try:
        with get_client(sync_client=True) as client:
            if event is not None:
                page = client.read_events(filter=EventFilter(id=EventIDFilter(id=[event])), limit=1)
                if page.events:
                    occurred = page.events[0].occurred
            if train_run is not None:
                train_name = client.read_flow_run(train_run).name
    except Exception as error:  # links are a courtesy: never fail the evaluation for them
        logger.warning("Could not read the trigger's event or train run: %s", error)
    event_link = ui_url(f"events/event/{occurred.strftime('%Y-%m-%d')}/{event}") if event else None
    train_link = ui_url(f"runs/flow-run/{train_run}") if train_run else None
    log.info(
        "Started by tml.checkpoint.committed event %s (%s) for %s, committed by train run %r (%s).",
        event or "?",
        event_link or "no UI",
        checkpoint,
        train_name,
        train_link or "no UI",
    )


def announce_evaluated(
    *,
    checkpoint: str,
    step: int,
    experiment: str,
    save_dir: str,
    partition: str,
    metrics: Mapping[str, float],
    event_id: str | None,
    train_flow_run_id: str | None,
) -> None:
    """Emit ``tml.checkpoint.evaluated`` for ``checkpoint`` (best effort)."""
    related: list[dict[str, str]] = []
    train_run = _uuid(train_flow_run_id)
    if train_run is not None:
        related.append(
            {
                "prefect.resource.id": f"prefect.flow-run.{train_run}",
                "prefect.resource.role": "train",
            }
        )
    own = flow_run.get_id()
    if own:
        related.append(
            {
                "prefect.resource.id": f"prefect.flow-run.{own}",
                "prefect.resource.role": "evaluator",
                "prefect.resource.name": flow_run.get_name() or "",
            }
        )
    event = _uuid(event_id)
    if event is not None:
        related.append(
            {"prefect.resource.id": f"prefect.event.{event}", "prefect.resource.role": "trigger"}
        )
    try:
        emit_event(
            event=EVALUATED,
            resource={
                "prefect.resource.id": checkpoint,
                "prefect.resource.name": f"{experiment} step {step}",
                "tml.save_dir": save_dir.rstrip("/"),
                "tml.experiment": experiment,
                "tml.step": str(step),
                "tml.partition": partition,
            },
            related=related,
            payload={
                "step": step,
                "partition": partition,
                "metrics": dict(metrics),
                "experiment": experiment,
                "trigger_event_id": str(event) if event else None,
                "train_flow_run_id": str(train_run) if train_run else None,
            },
        )
    except Exception as error:  # an event must not fail an evaluation that is on disk
        logger.warning("%s not emitted for %s: %s", EVALUATED, checkpoint, error)


def who_evaluated(experiment: str, partition: str, step: int) -> str | None:
    """The name of the flow run that evaluated ``step`` of ``experiment`` on ``partition``
    (the first Completed task run; a "Skipped" one only found it done), or ``None``."""
    try:
        with get_client(sync_client=True) as client:
            task_runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(
                    tags=FlowRunFilterTags(all_=[EXPERIMENT_TAG + experiment])
                ),
                task_run_filter=TaskRunFilter(
                    name=TaskRunFilterName(any_=[task_run_name(partition, step)]),
                    state=TaskRunFilterState(name=TaskRunFilterStateName(any_=["Completed"])),
                ),
                sort=TaskRunSort.EXPECTED_START_TIME_ASC,
                limit=5,
            )
            for task_run in task_runs:
                if task_run.flow_run_id:
                    return client.read_flow_run(task_run.flow_run_id).name
    except Exception as error:  # the answer is for a name: never fail the run for it
        logger.warning("Could not ask who evaluated step %s: %s", step, error)
    return None
