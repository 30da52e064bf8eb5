"""Names of runs and artifacts, taken from the run's experiment (:mod:`training.experiment`:
the name given, or ``save_dir``'s last part plus a short hash of its URL).

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
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from prefect.runtime import flow_run, task_run

from tml_checkpointing import CheckpointError
from training.experiment import canonical_url, derived_experiment
from training.run_info import experiment_of

EXPERIMENT_TAG = "experiment:"
"""Prefix of the tag that files a flow run under its experiment (filterable in the runs list)."""


class ExperimentCollisionError(CheckpointError, ValueError):
    """An experiment name given to a run already names runs of another ``save_dir``."""


def artifact_key(*parts: str) -> str:
    """A valid artifact key from ``parts`` (lowercased; anything else becomes a dash)."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def flow_run_namer(
    flow: str,
    directory_parameter: str,
    *details: str,
    experiment_parameter: str | None = None,
    checkpoint_parameter: str | None = None,
    restart_parameter: str | None = None,
) -> Callable[[], str]:
    """A ``flow_run_name`` callable: ``train · exp1 · epochs=3`` from the run's parameters;
    ``· step 20`` when ``checkpoint_parameter`` names a checkpoint (an event-started run);
    ``· restart 2`` when ``restart_parameter`` holds a restart (a run the resume automation
    started, :class:`training.config.RestartOf`).

    A parameter is named by its path: ``save_dir``, or ``config.save_dir`` for a field of a
    model parameter (shown by its last part: ``epochs=3``). The experiment is the one
    ``experiment_parameter`` gives, else the one of the directory (:func:`run_experiment`).
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
        given = parameter_value(parameters, experiment_parameter or "")
        options = parameter_value(
            parameters, directory_parameter.rpartition(".")[0] + ".storage_options"
        )
        named = run_experiment(str(directory or "?"), options, given)
        return " · ".join([flow, named, *shown])

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
    """``epoch 2 · exp1-3f9a1c``: which experiment's epoch a task run is, in the task list."""
    parameters = task_run.parameters
    config = parameters.get("config")
    named = run_experiment(
        str(getattr(config, "save_dir", "?")),
        getattr(config, "storage_options", None),
        getattr(config, "experiment", None),
    )
    return f"epoch {parameters.get('epoch', '?')} · {named}"


def run_experiment(save_dir: str, storage_options: Any, given: str | None) -> str:
    """The experiment for a name: :func:`training.run_info.experiment_of`, or (``run.json``
    unreadable, a bad name: the flow itself reports those) what can be said without it."""
    try:
        return experiment_of(save_dir, storage_options, given)
    except CheckpointError:
        try:
            return given or derived_experiment(save_dir, storage_options)
        except CheckpointError:
            return save_dir.rstrip("/").rsplit("/", 1)[-1] or save_dir


def tag_run_with_experiment(experiment: str) -> None:
    """Add ``experiment:<name>`` to the running flow run's tags (filterable in the runs list).

    Tags of a deployment's run are fixed before the flow starts; the experiment is a parameter,
    so the flow adds it itself. Best effort: a run is not failed for a tag.
    """
    run_id = flow_run.get_id()
    if not run_id:
        return
    tag = EXPERIMENT_TAG + experiment
    try:
        with get_client(sync_client=True) as client:
            tags = set(client.read_flow_run(UUID(run_id)).tags)
            if tag not in tags:
                client.update_flow_run(UUID(run_id), tags=sorted(tags | {tag}))
    except Exception as error:  # the API is the only thing that can fail here
        logging.getLogger(__name__).warning("Run not tagged %s: %s", tag, error)


def check_experiment_is_free(
    experiment: str, save_dir: str, storage_options: Any, *, directory_parameter: str
) -> None:
    """Refuse a given experiment name that already files runs of another ``save_dir``.

    A name given by the user (``experiment``) is only recorded in its own ``run.json``; two
    directories given one name would share every key, tag and limit. The flow runs tagged
    ``experiment:<name>`` say which directories use it (their ``directory_parameter``,
    ``config.save_dir`` or ``save_dir``), compared as full URLs.
    """
    mine = canonical_url(save_dir, storage_options)
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=[EXPERIMENT_TAG + experiment])
            ),
            limit=50,
        )
    for run in runs:
        if run.id == (UUID(flow_run.get_id()) if flow_run.get_id() else None):
            continue
        theirs = parameter_value(run.parameters, directory_parameter) or parameter_value(
            run.parameters, "save_dir"
        )
        if theirs and canonical_url(str(theirs), storage_options) != mine:
            raise ExperimentCollisionError(
                f"experiment {experiment!r} already names the runs of {theirs} (flow run "
                f"{run.name!r}); {save_dir} would share its artifacts, tags and evaluation "
                "limits. Give this run another experiment name, or leave experiment out to "
                "derive one from save_dir."
            )
