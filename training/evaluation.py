"""Evaluating one checkpoint on one partition, as a plain function (no Prefect inside).

The model is rebuilt from the run's recipe (``run.json``) and gets the checkpoint's weights
only. Metrics go to ``<checkpoint>/eval/<partition>.json`` (``write_checkpoint_metrics``, so
``keep_best`` can rank by ``"<partition>/<metric>"``), then the partition's done-marker
is set: a checkpoint already marked is not evaluated again, so a restarted evaluator picks up
exactly where it stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from recipes.base import load_recipe
from tml_checkpointing import (
    Snapshot,
    is_done_eval,
    mark_done_eval,
    read_checkpoint_metrics,
    step_from_checkpoint,
    write_checkpoint_metrics,
)
from tml_checkpointing.evaluation import metrics_path

from .run_info import read_run_info

logger = logging.getLogger(__name__)


class EvalConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    save_dir: str = Field(min_length=1)
    partition: str = Field(min_length=1)
    eval_steps: int = Field(default=10, ge=1)
    timeout: float = Field(default=1800, ge=0)
    poll_seconds: float = Field(default=10, gt=0)
    storage_options: dict[str, object] | None = None


class EvalResult(BaseModel):
    checkpoint: str
    step: int
    partition: str
    status: Literal["evaluated", "skipped"]
    metrics: dict[str, float] = {}
    metrics_path: str


def evaluate_checkpoint(
    config: EvalConfig, checkpoint: str, log: Callable[[str], object] = logger.info
) -> EvalResult:
    """Evaluate ``checkpoint`` on ``config.partition`` unless that is already done."""
    options = config.storage_options
    step = step_from_checkpoint(checkpoint)
    path = metrics_path(checkpoint, config.partition)
    if is_done_eval(checkpoint, config.partition, storage_options=options):
        log(f"step {step}: already evaluated on {config.partition}, skipping")
        return EvalResult(
            checkpoint=checkpoint,
            step=step,
            partition=config.partition,
            status="skipped",
            metrics=read_checkpoint_metrics(
                checkpoint, partition=config.partition, storage_options=options
            ),
            metrics_path=path,
        )
    info = read_run_info(config.save_dir, options)
    recipe = load_recipe(info.recipe)(info.recipe_params())
    Snapshot(config.save_dir, {"model": recipe.model}, storage_options=options).restore(
        checkpoint, keys=["model"]
    )
    metrics = recipe.evaluate(
        recipe.model, recipe.eval_batches(config.partition, config.eval_steps)
    )
    write_checkpoint_metrics(
        checkpoint, metrics, partition=config.partition, storage_options=options
    )
    mark_done_eval(checkpoint, config.partition, storage_options=options)
    log(
        f"step {step}: {config.partition} "
        + " ".join(f"{name}={value:.4f}" for name, value in sorted(metrics.items()))
    )
    return EvalResult(
        checkpoint=checkpoint,
        step=step,
        partition=config.partition,
        status="evaluated",
        metrics=metrics,
        metrics_path=path,
    )
