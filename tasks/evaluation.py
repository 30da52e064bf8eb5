"""Prefect task evaluating one checkpoint: a thin wrapper over
:func:`training.evaluation.evaluate_checkpoint`. Checkpoints already marked done for the
partition come back as COMPLETED task runs named "Skipped"."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from training.evaluation import EvalConfig, evaluate_checkpoint


@task(
    name="evaluate-checkpoint",
    task_run_name="{config.partition}-step-{step}",
    retries=1,
    retry_delay_seconds=0,
    cache_policy=NO_CACHE,  # the done-marker in the checkpoint is the record of what is done
)
def evaluate_checkpoint_task(config: EvalConfig, checkpoint: str, step: int) -> Any:
    result = evaluate_checkpoint(config, checkpoint, log=get_run_logger().info)
    if result.status == "skipped":
        return Completed(
            name="Skipped",
            message=f"step {step} already evaluated on {config.partition}",
            data=result,
        )
    return result
