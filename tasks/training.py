"""Prefect task for one training epoch: a thin wrapper over :func:`training.loop.train_epoch`.

Parameters are the run's config and the epoch number; the model lives in the process
(:mod:`training.session`), or, with several ranks, in the ``torchrun`` job the task launches
for the epoch (:mod:`training.launch`; ``layout`` says where this machine sits in it). The
result is the epoch's committed checkpoint path and metrics.
Completed epochs come back as a COMPLETED state named "Skipped", so the Prefect UI shows
what a resumed run did not redo instead of leaving it out.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State
from prefect.runtime import task_run
from prefect.states import Completed

from tasks.naming import epoch_task_run_name
from training.config import DEFAULT_EPOCH_RETRIES, NodeLayout, TrainConfig
from training.failures import retry_cannot_help
from training.launch import train_epoch_on_ranks
from training.loop import EpochResult, claim_injected_failure, train_epoch
from training.session import get_session


@task(
    name="train-epoch",
    task_run_name=epoch_task_run_name,
    retries=DEFAULT_EPOCH_RETRIES,  # the flow sets TrainOptions.epoch_retries
    retry_delay_seconds=0,
    # The checkpoint directory decides what is done; Prefect's cache could outlive or
    # predate the files (and would hash the config on every call for nothing).
    cache_policy=NO_CACHE,
    retry_condition_fn=lambda task, task_run, state: _retryable(state),
)
def train_epoch_task(config: TrainConfig, epoch: int, layout: NodeLayout | None = None) -> Any:
    """One epoch; a retry is said at WARNING (the UI's "warnings and above" filter keeps it),
    and so is the failure that caused it, with its cause."""
    logger = get_run_logger()
    attempt = task_run.run_count or 1
    if attempt > 1:
        logger.warning(
            "epoch %s: attempt %s (a retry): restores the newest committed checkpoint first",
            epoch,
            attempt,
        )
    try:
        return _train_epoch(config, epoch, layout, logger, attempt)
    except Exception as error:
        logger.warning(
            "epoch %s: attempt %s failed: %s: %s", epoch, attempt, type(error).__name__, error
        )
        raise


def _train_epoch(
    config: TrainConfig, epoch: int, layout: NodeLayout | None, logger: Any, attempt: int
) -> Any:
    session = get_session(config)
    session.attempt = attempt
    if config.world_size == 1:
        result: EpochResult = train_epoch(session, epoch, log=logger.info)
    else:
        result = train_epoch_on_ranks(
            config,
            epoch,
            layout or NodeLayout(),
            config_from_step=session.config_from_step,
            attempt=attempt,
            inject_failure=claim_injected_failure(config, epoch),
            preemption=session.preemption,
            log=logger.info,
        )
    result.attempt = attempt
    if attempt > 1 and result.status == "trained":
        logger.warning(
            "epoch %s: attempt %s restored step %s and trained steps %s-%s",
            epoch,
            attempt,
            result.resumed_from_step,
            result.resumed_from_step + 1,
            result.last_step,
        )
    if result.status == "skipped":
        return Completed(
            name="Skipped",
            message=f"epoch {epoch} restored from checkpoint (step {result.resumed_from_step})",
            data=result,
        )
    return result


def _retryable(state: State) -> bool:
    """Retry only what a retry can fix: not a preemption (the process is about to exit), a
    checkpoint that does not fit the model, a refused config, a held lock, a full disk
    (:func:`training.failures.retry_cannot_help`)."""
    error = state.result(raise_on_failure=False)
    return not (isinstance(error, BaseException) and retry_cannot_help(error))
