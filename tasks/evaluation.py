"""Prefect task evaluating one checkpoint: a thin wrapper over
:func:`training.evaluation.evaluate_checkpoint`. Checkpoints already marked done for the
partition come back as COMPLETED task runs named "Skipped"; evaluated ones as "Completed" (what
:func:`tasks.eval_events.who_evaluated` looks for).

The caller holds the experiment and partition's evaluation slot (:mod:`tasks.eval_limits`)
around the done-check and the evaluation: that is what makes each checkpoint evaluated once.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from training.evaluation import EvalConfig, LoadedModel, evaluate_checkpoint


@task(
    name="evaluate-checkpoint",
    task_run_name="{config.partition}-step-{step}",
    retries=1,
    retry_delay_seconds=0,
    cache_policy=NO_CACHE,  # the done-marker in the checkpoint is the record of what is done
)
def evaluate_checkpoint_task(
    config: EvalConfig, checkpoint: str, step: int, model: LoadedModel | None = None
) -> Any:
    """``model``: the flow run's kept model (built once, restored into for each checkpoint)."""
    result = evaluate_checkpoint(config, checkpoint, log=get_run_logger().info, model=model)
    if result.status == "skipped":
        return Completed(
            name="Skipped",
            message=f"step {step} already evaluated on {config.partition}",
            data=result,
        )
    return result
