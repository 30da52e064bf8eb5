"""Names of runs and artifacts, taken from the experiment: the last part of its ``save_dir``.

Why: the runs list, the task list and the Artifacts page show names and keys, not parameters.
With random run names and one artifact key shared by every experiment, a person cannot tell
two experiments apart there, and each run's artifacts replace the previous run's. Prefect
artifact keys allow lowercase letters, digits and dashes only.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.runtime import flow_run, task_run


def experiment(save_dir: str) -> str:
    """``s3://bucket/runs/exp1/`` -> ``exp1``: the name a person gave the run's directory."""
    return save_dir.rstrip("/").rsplit("/", 1)[-1] or save_dir


def artifact_key(*parts: str) -> str:
    """A valid artifact key from ``parts`` (lowercased; anything else becomes a dash)."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def flow_run_namer(
    flow: str,
    directory_parameter: str,
    *details: str,
    checkpoint_parameter: str | None = None,
    restart_parameter: str | None = None,
) -> Callable[[], str]:
    """A ``flow_run_name`` callable: ``train · exp1 · epochs=3`` from the run's parameters;
    ``· step 20`` when ``checkpoint_parameter`` names a checkpoint (an event-started run);
    ``· restart 2`` when ``restart_parameter`` holds a restart (a run the resume automation
    started, :class:`training.config.RestartOf`).

    A parameter is named by its path: ``save_dir``, or ``config.save_dir`` for a field of a
    model parameter (shown by its last part: ``epochs=3``).
    """

    def name() -> str:
        parameters = flow_run.parameters
        directory = parameter_value(parameters, directory_parameter)
        shown = []
        for path in details:
            value = parameter_value(parameters, path)
            if value is not None:
                shown.append(f"{path.rsplit('.', 1)[-1]}={value}")
        checkpoint = parameter_value(parameters, checkpoint_parameter or "")
        if checkpoint:
            shown.append(f"step {str(checkpoint).rstrip('/').rsplit('/', 1)[-1]}")
        restart = parameter_value(
            parameters, f"{restart_parameter}.number" if restart_parameter else ""
        )
        if restart is not None:
            shown.append(f"restart {restart}")
        return " · ".join([flow, experiment(str(directory or "?")), *shown])

    return name


def parameter_value(parameters: Mapping[str, Any], path: str) -> Any:
    """The value at ``path`` (``config.save_dir``) in a run's parameters, or None.

    A model parameter is a dict in a deployment's run, and the model itself in a direct call.
    """
    value: Any = parameters
    for part in path.split(".") if path else ():
        value = value.get(part) if isinstance(value, Mapping) else getattr(value, part, None)
        if value is None:
            return None
    return value if path else None


def epoch_task_run_name() -> str:
    """``epoch 2 · exp1``: which experiment's epoch a task run is, in the task list."""
    parameters = task_run.parameters
    config = parameters.get("config")
    directory = getattr(config, "save_dir", "?")
    return f"epoch {parameters.get('epoch', '?')} · {experiment(str(directory))}"


def tag_run_with_experiment(save_dir: str) -> None:
    """Add ``experiment:<name>`` to the running flow run's tags (filterable in the runs list).

    Tags of a deployment's run are fixed before the flow starts; the experiment is a parameter,
    so the flow adds it itself. Best effort: a run is not failed for a tag.
    """
    run_id = flow_run.get_id()
    if not run_id:
        return
    tag = f"experiment:{experiment(save_dir)}"
    try:
        with get_client(sync_client=True) as client:
            tags = set(client.read_flow_run(UUID(run_id)).tags)
            if tag not in tags:
                client.update_flow_run(UUID(run_id), tags=sorted(tags | {tag}))
    except Exception as error:  # the API is the only thing that can fail here
        logging.getLogger(__name__).warning("Run not tagged %s: %s", tag, error)
