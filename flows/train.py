"""The ``train`` flow: epochs as Prefect tasks over one in-process model, resumable anywhere.

At start, ``get_latest_valid_checkpoint(save_dir)`` says where the run stands; completed
epochs show up as "Skipped" task runs, a checkpoint taken mid-epoch resumes at the right batch,
and a run whose final checkpoint exists finishes at once. Parameters are flat keyword arguments
so that ``prefect deployment run 'train/train' --param epochs=3`` and the UI's run form work.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.runtime import flow_run
from pydantic import BaseModel

from flows.reporting import ThrottledReport
from flows.signals import exiting
from recipes.base import DEFAULT_RECIPE
from tasks.checkpoint_events import CheckpointAnnouncer
from tasks.naming import artifact_key, experiment, flow_run_namer, tag_run_with_experiment
from tasks.training import DEFAULT_TASK_RETRIES, train_epoch_task
from tml_checkpointing import (
    CheckpointError,
    join_url,
    read_checkpoint_metrics,
    step_from_checkpoint,
)
from tml_checkpointing import wait_for_evaluators as wait_for_evaluators_to_finish
from tml_checkpointing.errors import PreemptedError
from tml_checkpointing.incremental import DEFAULT_FULL_EVERY, MIN_CHAINED_BYTES
from tml_checkpointing.locking import WriterLock
from tml_checkpointing.preemption import PreemptionGuard
from training.config import TrainConfig
from training.determinism import set_deterministic
from training.launch import NodeLayout
from training.loop import EpochResult
from training.session import close_session, get_session
from training.start import check_run_start, record_run_start


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


@flow(name="train", flow_run_name=flow_run_namer("train", "save_dir", "epochs"))
def train(
    save_dir: str,
    epochs: int = 3,
    steps_per_epoch: int = 20,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    checkpoint_every_steps: int = 0,
    recipe: str = DEFAULT_RECIPE,
    initial_checkpoint: str | None = None,
    storage_options: dict[str, Any] | None = None,
    fail_at_step: int | None = None,
    epoch_retries: int = DEFAULT_TASK_RETRIES,
    wait_for_evaluators: list[str] | None = None,
    evaluator_timeout: float = 600,
    keep_last: int | None = None,
    keep_every_steps: int | None = None,
    incremental: bool = False,
    full_every: int = DEFAULT_FULL_EVERY,
    incremental_min_bytes: int = MIN_CHAINED_BYTES,
    allow_changed_config: bool = False,
    nproc_per_node: int = 1,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
) -> TrainResult:
    """Train ``epochs`` epochs into ``save_dir``, resuming from its newest checkpoint.

    Args:
        save_dir: Checkpoint directory of the run, a local path or an fsspec URL
            (``s3://bucket/runs/exp1``). Its last part names the run and its artifacts.
        epochs: Epochs to train in total. A resumed run skips the epochs already covered by
            a checkpoint; epochs may grow between runs.
        steps_per_epoch: Training steps (batches per rank) in one epoch.
        batch_size: Examples per step and rank.
        lr: Learning rate of the recipe's optimizer.
        seed: Seed of the model's initial weights and of the data order.
        checkpoint_every_steps: Also checkpoint every N steps within an epoch; 0 means only
            at the end of each epoch.
        recipe: The model and data, as ``module:function`` (``recipes.ranking:build``,
            ``recipes.torchrec_ranking:build``).
        initial_checkpoint: Warm start: a checkpoint whose model weights (only) start this
            run; the step count starts at 0.
        storage_options: Options for the fsspec filesystem of ``save_dir`` (for S3:
            ``endpoint_url``, ``key``, ``secret``...).
        fail_at_step: Tests and demos: fail once when this step is reached, to watch the
            epoch's retry restore the newest checkpoint.
        epoch_retries: How often a failed epoch is retried; each retry first restores the
            newest committed checkpoint.
        wait_for_evaluators: Partitions whose evaluators must mark the final checkpoint done
            before the run ends.
        evaluator_timeout: Seconds to wait for those evaluators; the result says who
            finished.
        keep_last: Retention after each epoch: keep the newest N checkpoints (empty: keep
            all).
        keep_every_steps: Retention: also keep every checkpoint whose step is a multiple of
            this (milestones).
        incremental: Save only the changed rows of large tensors (embedding tables) since
            the previous save; see docs/incremental.md.
        full_every: Incremental saves: every N-th save is a full checkpoint.
        incremental_min_bytes: Incremental saves: tensors at least this large (bytes) are
            saved as changed rows.
        allow_changed_config: Resume even though recipe, seed, batch size, steps per epoch,
            lr or world size differ from what run.json recorded (recorded as a new segment).
        nproc_per_node: Ranks per machine; above 1, each epoch runs under torchrun.
        nnodes: Machines taking part in every epoch.
        node_rank: This machine's rank; node 0 commits checkpoints and holds the lock.
        rdzv_endpoint: ``host:port`` of node 0 when ``nnodes`` > 1.

    On SIGTERM/SIGINT/SIGUSR1 the step in progress is checkpointed and the process exits with
    128 + signum (the flow run ends Crashed). A run's parameters are recorded in
    ``<save_dir>/run.json`` at its first start; resuming with other values of recipe, seed,
    batch_size, steps_per_epoch, lr or world size (ranks per node times nodes), or fewer
    epochs, is refused (``RunConfigChangedError``, nothing written) unless
    ``allow_changed_config``. With several machines, the same flow runs on each with its
    ``node_rank``, all meeting at ``rdzv_endpoint``; node 0 holds the writer lock, records
    ``run.json``, commits (its rank 0), applies retention and publishes the artifacts.
    """
    config = train_config(
        save_dir=save_dir,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        checkpoint_every_steps=checkpoint_every_steps,
        recipe=recipe,
        initial_checkpoint=initial_checkpoint,
        storage_options=storage_options,
        fail_at_step=fail_at_step,
        keep_last=keep_last,
        keep_every_steps=keep_every_steps,
        incremental=incremental,
        full_every=full_every,
        incremental_min_bytes=incremental_min_bytes,
        wait_for_evaluators=wait_for_evaluators,
        nproc_per_node=nproc_per_node,
        nnodes=nnodes,
    )
    layout = NodeLayout(node_rank=node_rank, rdzv_endpoint=rdzv_endpoint)
    layout.check(config)
    tag_run_with_experiment(save_dir)
    owner = f"train flow run {flow_run.get_name()} ({flow_run.get_id()})"
    try:
        # Everything that can refuse this start, before the first write (lock, run.json).
        check_run_start(config, allow_changed_config=allow_changed_config)
        if layout.node_rank > 0:  # node 0's flow owns save_dir; this one lends its ranks
            return run_training(
                config,
                epoch_retries=epoch_retries,
                allow_changed_config=allow_changed_config,
                layout=layout,
            )
        # The run owns save_dir until it ends, evaluator wait included: a second run is refused.
        with WriterLock(save_dir, owner=owner, storage_options=storage_options):
            result = run_training(
                config,
                epoch_retries=epoch_retries,
                allow_changed_config=allow_changed_config,
                layout=layout,
            )
            if wait_for_evaluators:
                _wait_for_evaluators(
                    result, wait_for_evaluators, evaluator_timeout, storage_options
                )
    finally:
        close_session(config)  # a refused start built the session to compare shapes
    _publish(result)
    return result


# Flow parameters that are not part of the run's TrainConfig.
FLOW_ONLY_PARAMETERS = frozenset(
    {"epoch_retries", "evaluator_timeout", "allow_changed_config", "node_rank", "rdzv_endpoint"}
)


def train_config(*, wait_for_evaluators: list[str] | None = None, **fields: Any) -> TrainConfig:
    """The run's config from the flow's parameters (less :data:`FLOW_ONLY_PARAMETERS`).

    ``tml train`` checks a start before Prefect is up; building the config the same way makes
    it find the same in-process session (model) the flow then trains.
    """
    return TrainConfig(**fields, keep_until_evaluated=tuple(wait_for_evaluators or ()))


def _wait_for_evaluators(
    result: TrainResult,
    partitions: list[str],
    timeout: float,
    storage_options: dict[str, Any] | None,
) -> None:
    waited = wait_for_evaluators_to_finish(
        result.save_dir,
        partitions,
        result.final_step,
        timeout,
        poll_seconds=min(2.0, max(timeout / 10, 0.1)),
        storage_options=storage_options,
    )
    result.evaluators_finished = list(waited.finished)
    result.evaluators_pending = list(waited.pending)
    logger = get_run_logger()
    if waited.pending:
        logger.warning("Evaluators not done after %ss: %s", timeout, waited.pending)
    else:
        logger.info("Evaluators finished on step %s: %s", result.final_step, waited.finished)


def run_training(
    config: TrainConfig,
    epoch_retries: int = DEFAULT_TASK_RETRIES,
    *,
    allow_changed_config: bool = False,
    layout: NodeLayout | None = None,
) -> TrainResult:
    """The flow's body (a plain function of the config, called inside the flow run, with the
    writer lock held on node 0)."""
    layout = layout or NodeLayout()
    logger = get_run_logger()
    set_deterministic()
    # Checked again under the lock: another start may have recorded the run meanwhile.
    start = check_run_start(config, allow_changed_config=allow_changed_config)
    if layout.node_rank == 0:
        record_run_start(config, start)
    resumed_from = start.resumed_from
    logger.info("Run %s: %s", config.save_dir, _start_description(config, resumed_from))
    progress = create_progress_artifact(
        progress=0.0,
        key=artifact_key("train-progress", experiment(config.save_dir)),
        description=f"epochs of {config.save_dir}",
    )
    results: list[EpochResult] = []
    epoch_task = train_epoch_task.with_options(retries=epoch_retries)
    session = get_session(config)
    announcer = CheckpointAnnouncer(
        config.save_dir,
        lambda step: _describe_checkpoint(config, session.checkpoint_metrics, step),
        after_step=step_from_checkpoint(resumed_from) if resumed_from else 0,
        storage_options=config.storage_options,
    )
    report = ThrottledReport(config.save_dir, config.storage_options)
    publishes = layout.node_rank == 0  # node 0 owns save_dir and its artifacts
    try:
        with preemption_guard() as guard, announcer:
            session.preemption = guard
            for epoch in range(config.epochs):
                # A skipped epoch returns a "Skipped" state; .result() gives its data either way.
                state = epoch_task(config, epoch, layout, return_state=True)
                results.append(state.result())
                update_progress_artifact(progress, progress=100.0 * (epoch + 1) / config.epochs)
                if publishes and config.world_size > 1:  # ranks committed in their processes
                    _catch_up(announcer)
                if publishes and results[-1].status == "trained":
                    report.epoch_trained(epoch)
            if publishes:
                _catch_up(announcer)
                report.flush()
    except PreemptedError as preempted:
        logger.warning("%s", preempted)
        # Exiting (not failing) marks the flow run Crashed, and no in-process retry starts on
        # a machine that is going away; the next run resumes from the final checkpoint.
        raise SystemExit(preempted.exit_code) from preempted
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


def _publish(result: TrainResult) -> None:
    create_table_artifact(
        key=artifact_key("train-epochs", experiment(result.save_dir)),
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
        key=artifact_key("train-summary", experiment(result.save_dir)),
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
def preemption_guard() -> Iterator[PreemptionGuard | None]:
    """Catch SIGTERM/SIGINT/SIGUSR1 while training, where Python can (the main thread only).

    The training loop acts on a signal at the next step (checkpoint, ``PreemptedError``). A
    signal that came when no step was left (during the last save) is honoured here: every
    epoch is committed, and the process still exits with 128 + signum, as asked.
    """
    if threading.current_thread() is not threading.main_thread():
        get_run_logger().warning("Not in the main thread: preemption signals are not caught.")
        yield None
        return
    with PreemptionGuard() as guard:
        try:
            yield guard
        except PreemptedError as preempted:
            # The final checkpoint is written; what is left (reporting the crash, stopping
            # Prefect) is bounded, so a dead API cannot hold the process (``tml`` only).
            exiting(preempted.exit_code)
            raise
    if guard.requested:
        get_run_logger().warning(
            "%s received after the last step: all epochs are committed; exiting with %s.",
            guard.signal_name,
            guard.exit_code,
        )
        raise SystemExit(guard.exit_code)
