"""The ``train`` flow: epochs as Prefect tasks over one in-process model, resumable anywhere.

At start, ``get_latest_valid_checkpoint(save_dir)`` says where the run stands; completed
epochs show up as "Skipped" task runs, a checkpoint taken mid-epoch resumes at the right batch,
and a run whose final checkpoint exists finishes at once. Its two parameters are the models of
training/config.py: ``config`` (the run) and ``options`` (this flow run's operational knobs);
Prefect builds the run form from their JSON schema, field descriptions included, and a
deployment run overrides them as JSON objects (docs/deploy.md).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any, cast
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.runtime import flow_run
from pydantic import BaseModel

from flows.comparison import publish_comparison_around
from flows.reporting import ThrottledReport, publish_checkpoints
from flows.restarts import begin_restart, preempted_state
from flows.signals import exiting, stopping_exit_code
from tasks.checkpoint_events import CheckpointAnnouncer
from tasks.naming import (
    artifact_key,
    check_experiment_is_free,
    flow_run_namer,
    tag_run_with_experiment,
)
from tasks.training import train_epoch_task
from tml_checkpointing import (
    CheckpointError,
    join_url,
    read_checkpoint_metrics,
    step_from_checkpoint,
)
from tml_checkpointing import wait_for_evaluators as wait_for_evaluators_to_finish
from tml_checkpointing.errors import CheckpointShapeMismatchError, PreemptedError
from tml_checkpointing.lifecycle.preemption import PreemptionGuard
from tml_checkpointing.storage.locking import WriterLock
from training.config import RestartOf, TrainConfig, TrainOptions
from training.determinism import set_deterministic
from training.loop import EpochResult
from training.run_info import experiment_of
from training.session import close_session, get_session
from training.start import check_run_start, record_run_start

DEFAULT_OPTIONS = TrainOptions()  # frozen: one shared default


class TrainResult(BaseModel):
    """What a training run reports (also the CLI's ``--json`` output)."""

    save_dir: str
    final_step: int
    checkpoint: str
    resumed_from: str
    initial_checkpoint: str | None = None  # warm start: the weights this run started from
    epochs_run: list[int]
    epochs_skipped: list[int]
    evaluators_finished: list[str] = []
    evaluators_pending: list[str] = []
    epochs: list[EpochResult]


@flow(
    name="train",
    flow_run_name=flow_run_namer(
        "train",
        "config.save_dir",
        "config.epochs",
        experiment_parameter="config.experiment",
        restart_parameter="restart_of",
    ),
)
def train(
    config: TrainConfig,
    options: TrainOptions = DEFAULT_OPTIONS,
    restart_of: RestartOf | None = None,
) -> TrainResult:
    """Train ``config.epochs`` epochs into ``config.save_dir``, resuming from its newest checkpoint.

    Each parameter is described in training/config.py (and docs/training.md#parameters).
    On SIGTERM/SIGINT/SIGUSR1 the step in progress is checkpointed and the run ends Crashed,
    named Preempted, saying where its checkpoint is (``tml train`` exits with 128 + signum;
    a cancelled run ends Cancelled). A resume that changes the run's identity is
    refused unless ``options.allow_changed_config``. With several machines, the same flow runs
    on each with its ``node_rank``; node 0 holds the writer lock, records ``run.json``,
    commits, applies retention and publishes the artifacts.

    Args:
        config: The run: what it computes (recorded in ``run.json`` at its first start) and
            how its checkpoints are written and kept.
        options: How this flow run operates (retries, evaluator wait, a changed config
            allowed) and where its machine sits in a multi-machine job.
        restart_of: Set by the resume automation (automations.yaml) only: the crashed or
            preempted run this one resumes, and the restart's number in the lineage.

    A returned ``State`` (preempted, or not restarted past ``options.max_restarts``) becomes
    the run's final state; a caller of the flow then gets its exception raised, never the
    state, so the declared return type holds for callers (hence the casts).
    """
    stop = begin_restart(restart_of, options)
    if stop is not None:
        return cast(TrainResult, stop)
    options.check(config)
    experiment = experiment_of(config.save_dir, config.storage_options, config.experiment)
    if config.experiment:  # a derived name cannot collide; a given one may
        check_experiment_is_free(
            experiment,
            config.save_dir,
            config.storage_options,
            directory_parameter="config.save_dir",
        )
    tag_run_with_experiment(experiment)
    owner = f"train flow run {flow_run.get_name()} ({flow_run.get_id()})"
    try:
        # Everything that can refuse this start, before the first write (lock, run.json).
        check_run_start(config, allow_changed_config=options.allow_changed_config)
        if options.node_rank > 0:  # node 0's flow owns save_dir; this one lends its ranks
            return run_training(config, options, experiment=experiment)
        # The run owns save_dir until it ends, evaluator wait included: a second run is refused.
        with WriterLock(config.save_dir, owner=owner, storage_options=config.storage_options):
            result = run_training(config, options, experiment=experiment)
            if config.wait_for_evaluators:
                _wait_for_evaluators(result, config, options.evaluator_timeout)
                publish_checkpoints(  # the train run's own tab then holds their metrics too
                    config.save_dir,
                    config.storage_options,
                    experiment=experiment,
                    moment="after its evaluators",
                )
    except PreemptedError as preempted:
        return cast(TrainResult, preempted_state(preempted, config))
    finally:
        close_session(config)  # a refused one-process start built its model to compare shapes
    _publish(result, experiment)
    if options.node_rank == 0:
        publish_comparison_around(
            config.save_dir, config.storage_options, moment=f"after training {experiment}"
        )
    return result


def _wait_for_evaluators(result: TrainResult, config: TrainConfig, timeout: float) -> None:
    waited = wait_for_evaluators_to_finish(
        result.save_dir,
        config.wait_for_evaluators,
        result.final_step,
        timeout,
        poll_seconds=min(2.0, max(timeout / 10, 0.1)),
        storage_options=config.storage_options,
    )
    result.evaluators_finished = list(waited.finished)
    result.evaluators_pending = list(waited.pending)
    logger = get_run_logger()
    if waited.pending:
        logger.warning("Evaluators not done after %ss: %s", timeout, waited.pending)
    else:
        logger.info("Evaluators finished on step %s: %s", result.final_step, waited.finished)


def run_training(
    config: TrainConfig, options: TrainOptions = DEFAULT_OPTIONS, *, experiment: str
) -> TrainResult:
    """The flow's body (a plain function of the config, called inside the flow run, with the
    writer lock held on node 0); ``experiment`` keys its artifacts and events."""
    logger = get_run_logger()
    set_deterministic()
    # Checked again under the lock: another start may have recorded the run meanwhile.
    start = check_run_start(config, allow_changed_config=options.allow_changed_config)
    recorded = record_run_start(config, start) if options.node_rank == 0 else None
    resumed_from = start.resumed_from
    logger.info("Run %s: %s", config.save_dir, _start_description(config, resumed_from))
    progress = _progress_artifact(config, experiment)
    results: list[EpochResult] = []
    epoch_task = train_epoch_task.with_options(retries=options.epoch_retries)
    session = get_session(config)  # with ranks: bookkeeping only, the model is theirs
    announcer = CheckpointAnnouncer(
        config.save_dir,
        lambda step: _describe_checkpoint(config, session.checkpoint_metrics, step),
        experiment=experiment,
        after_step=step_from_checkpoint(resumed_from) if resumed_from else 0,
        storage_options=config.storage_options,
    )
    report = ThrottledReport(config.save_dir, config.storage_options, experiment)
    publishes = options.node_rank == 0  # node 0 owns save_dir and its artifacts
    try:
        with (
            preemption_guard(lambda: results[-1].last_step if results else None) as guard,
            announcer,
        ):
            session.preemption = guard
            for epoch in range(config.epochs):
                # A skipped epoch returns a "Skipped" state; .result() gives its data either way.
                state = epoch_task(config, epoch, options, return_state=True)  # a NodeLayout
                results.append(state.result())
                update_progress_artifact(  # type: ignore[call-arg]  # see _progress_artifact
                    progress, progress=100.0 * (epoch + 1) / config.epochs, _sync=True
                )
                if publishes and config.world_size > 1:  # ranks committed in their processes
                    _catch_up(announcer)
                if publishes and results[-1].status == "trained":
                    report.epoch_trained(epoch)
            if publishes:
                _catch_up(announcer)
                report.flush(moment="at the end of training")
    except PreemptedError as preempted:
        # Not a failure: no in-process retry starts on a machine that is going away; the
        # flow ends Preempted (flows.restarts) and the next run resumes from this checkpoint.
        logger.warning("%s", preempted)
        raise
    except CheckpointShapeMismatchError:
        # With ranks, the shape check is theirs, after run.json was recorded: a start they
        # refused before anything trained leaves run.json as a refusal here would have.
        if recorded is not None and not any(r.status == "trained" for r in results):
            recorded.undo()
        raise
    finally:
        close_session(config)
    return TrainResult(
        save_dir=config.save_dir,
        final_step=results[-1].last_step,
        checkpoint=results[-1].checkpoint,
        resumed_from=resumed_from,
        initial_checkpoint=config.initial_checkpoint,
        epochs_run=[r.epoch for r in results if r.status == "trained"],
        epochs_skipped=[r.epoch for r in results if r.status == "skipped"],
        epochs=results,
    )


def _progress_artifact(config: TrainConfig, experiment: str) -> UUID:
    """The run's progress artifact, created through Prefect's sync implementation.

    Prefect's artifact functions dispatch on the caller's context (``async_dispatch``): under
    a running event loop without a sync run context they return a coroutine, which would then
    be handed to ``update_progress_artifact`` as an id. ``_sync=True`` forces the sync path;
    the wrapper takes it, but its ``ParamSpec`` does not declare it (hence the narrow ignore).
    """
    artifact_id = create_progress_artifact(  # type: ignore[call-arg]  # _sync: see above
        progress=0.0,
        key=artifact_key("train-progress", experiment),
        description=f"epochs of {config.save_dir}",
        _sync=True,
    )
    if not isinstance(artifact_id, UUID):  # the sync implementation returns the id
        raise TypeError(f"create_progress_artifact returned {artifact_id!r}, not an id")
    return artifact_id


def _start_description(config: TrainConfig, resumed_from: str) -> str:
    if resumed_from:
        return f"resuming from {resumed_from}"
    if config.initial_checkpoint:
        return f"fresh, warm-started from the weights of {config.initial_checkpoint}"
    return "fresh"


def _describe_checkpoint(
    config: TrainConfig, saved_here: dict[int, dict[str, float]], step: int
) -> dict[str, Any]:
    """What a ``tml.checkpoint.committed`` event says of a checkpoint beyond its step."""
    metrics = saved_here.get(step)
    if metrics is None:  # committed by another process (a rank under torchrun)
        checkpoint = join_url(config.save_dir, str(step))
        metrics = read_checkpoint_metrics(checkpoint, storage_options=config.storage_options)
    return {
        "epoch": config.epoch_of_step(step),
        "mid_epoch": step % config.steps_per_epoch != 0,
        "metrics": dict(metrics),
    }


def _catch_up(announcer: CheckpointAnnouncer) -> None:
    """Announce what other processes (ranks) committed; an unreadable listing is only logged."""
    try:
        announcer.catch_up()
    except CheckpointError as error:
        get_run_logger().warning("Checkpoint events not caught up: %s", error)


def _publish(result: TrainResult, experiment: str) -> None:
    create_table_artifact(
        key=artifact_key("train-epochs", experiment),
        table=[
            {
                "epoch": r.epoch,
                "status": r.status,
                "attempt": r.attempt,
                "steps": f"{r.first_step}-{r.last_step}",
                "steps run": r.steps_run,
                "mean loss": None if r.mean_loss is None else round(r.mean_loss, 5),
                "steps/s": None if r.steps_per_second is None else round(r.steps_per_second, 1),
                "checkpoint": r.checkpoint,
            }
            for r in result.epochs
        ],
        description=f"Epochs of {result.save_dir}",
    )
    skipped = ", ".join(map(str, result.epochs_skipped)) or "none"
    warm = f"warm start from `{result.initial_checkpoint}`" if result.initial_checkpoint else ""
    started = f"`{result.resumed_from}`" if result.resumed_from else warm or "scratch"
    if result.resumed_from and warm:
        started += f" (the run began with a {warm})"
    create_markdown_artifact(
        key=artifact_key("train-summary", experiment),
        markdown=(
            f"# Training run `{result.save_dir}`\n\n"
            f"- resumed from: {started}\n"
            f"- epochs trained: {', '.join(map(str, result.epochs_run)) or 'none'}\n"
            f"- epochs skipped (restored from checkpoint): {skipped}\n"
            f"- final step: {result.final_step}\n"
            f"- final checkpoint: `{result.checkpoint}`\n"
            + (
                f"- evaluators finished: {result.evaluators_finished or 'none'}, "
                f"pending: {result.evaluators_pending or 'none'}\n"
                if result.evaluators_finished or result.evaluators_pending
                else ""
            )
        ),
        description="Training summary",
    )


@contextlib.contextmanager
def preemption_guard(last_step: Callable[[], int | None]) -> Iterator[PreemptionGuard | None]:
    """Catch SIGTERM/SIGINT/SIGUSR1 while training, where Python can (the main thread only).

    The training loop acts on a signal at the next step (checkpoint, ``PreemptedError``). A
    signal that came when no step was left (during the last save) is honoured here: every
    epoch is committed (``last_step``), and the run still stops as preempted, as asked.
    """
    if threading.current_thread() is not threading.main_thread():
        get_run_logger().warning("Not in the main thread: preemption signals are not caught.")
        yield None
        return
    stopping = stopping_exit_code()  # a stop signal that came while Prefect started the flow
    if stopping is not None:
        raise SystemExit(stopping)
    with PreemptionGuard() as guard:
        try:
            yield guard
        except PreemptedError as preempted:
            # The final checkpoint is written; what is left (reporting the crash, stopping
            # Prefect) is bounded, so a dead API cannot hold the process (``tml`` only).
            exiting(preempted.exit_code)
            raise
    if guard.requested:
        exiting(guard.exit_code)
        raise PreemptedError(
            f"{guard.signal_name} received after the last step: all epochs are committed",
            step=last_step(),
            signal_name=guard.signal_name or "a stop signal",
            exit_code=guard.exit_code,
        )
