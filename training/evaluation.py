"""Evaluating one checkpoint on one partition, as a plain function (no Prefect inside).

The model is built from the run's recipe (``run.json``: the segment that produced the
checkpoint) and gets the checkpoint's weights only. An evaluator that evaluates several
checkpoints keeps it (:class:`LoadedModel`): building a model costs seconds (imports, a recipe's
tables), restoring a checkpoint's weights into it a fraction of that, and every weight is
overwritten by the restore, so a kept model gives the very metrics a fresh one would. It is
rebuilt only when the checkpoint comes from another segment of the run. Metrics go to
``<checkpoint>/eval/<partition>.json`` (``write_checkpoint_metrics``, so ``keep_best`` can
rank by ``"<partition>/<metric>"``), then the partition's done-marker is set: a checkpoint
already marked is not evaluated again, so a restarted evaluator picks up exactly where it
stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from recipes.base import Recipe, load_recipe
from tml_checkpointing import (
    CheckpointError,
    Snapshot,
    is_done_eval,
    mark_done_eval,
    read_checkpoint_metrics,
    step_from_checkpoint,
    write_checkpoint_metrics,
)
from tml_checkpointing.catalog.evaluation import metrics_path
from tml_checkpointing.catalog.save_dir import assert_save_dir
from tml_checkpointing.storage.faults import reading
from tml_checkpointing.storage.filesystem import invalidate_listing, resolve

from .experiment import check_experiment_name
from .run_info import RunSegment, read_run_info

logger = logging.getLogger(__name__)


class EvalParams(BaseModel):
    """How an evaluator evaluates a run and follows it (the ``evaluate`` flow's ``params``, the
    options of ``tml evaluate``): each parameter declared once, here."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    partition: str = Field(
        default="validation",
        min_length=1,
        description="Which data to evaluate on (validation, test...); each partition's "
        "evaluator marks the checkpoints it finished, once each.",
    )
    eval_steps: int = Field(default=10, ge=1, description="Batches evaluated per checkpoint.")
    timeout: float = Field(
        default=1800,
        ge=0,
        description="Seconds to wait for a new checkpoint before giving up (the run may have "
        "ended).",
    )
    poll_seconds: float = Field(
        default=10, gt=0, description="Seconds between looks for new checkpoints."
    )
    wait_for_run: bool = Field(
        default=False,
        description="Wait (up to timeout) for a run to start in save_dir instead of failing at "
        "once when it does not exist yet.",
    )
    follow_seconds: float = Field(
        default=60,
        ge=0,
        description="An event-started evaluator, once nothing is pending, keeps its model "
        "loaded and evaluates the run's new checkpoints as they are committed, until the "
        "run's final step is evaluated or this many seconds pass with nothing new (0: stop "
        "at once).",
    )
    storage_options: dict[str, object] | None = Field(
        default=None, description="Options of the fsspec filesystem of save_dir."
    )


class EvalConfig(EvalParams):
    """One evaluator: the run it follows, and :class:`EvalParams`."""

    save_dir: str = Field(
        min_length=1,
        description="The training run's checkpoint directory (path or fsspec URL) to follow.",
    )
    experiment: str | None = Field(
        default=None,
        description="The run's experiment name (training.experiment); left out: the one its "
        "run.json records, else derived from save_dir. A name other than the recorded one is "
        "refused.",
    )

    @field_validator("experiment")
    @classmethod
    def _valid_experiment(cls, name: str | None) -> str | None:
        return None if name is None else check_experiment_name(name)


class RunNotFoundError(CheckpointError, FileNotFoundError):
    """The ``save_dir`` an evaluator should follow does not exist (and it was not asked to
    wait for it): most often a typo, which would otherwise wait silently until the timeout."""


def await_run(
    config: EvalConfig,
    log: Callable[[str], object] = logger.info,
    sleep: Callable[[float], object] = time.sleep,
) -> None:
    """Return once ``config.save_dir`` exists (and is a save_dir, not a checkpoint).

    A missing save_dir fails at once with :class:`RunNotFoundError`, unless
    ``config.wait_for_run``: then it waits up to ``config.timeout`` seconds for a run to
    start writing there, saying what it waits for, and fails the same way if none does.
    """
    options = config.storage_options
    fs, path = resolve(config.save_dir, options)

    def exists() -> bool:
        invalidate_listing(fs, path)  # another process creates it: no stale cached listing
        with reading(f"whether {config.save_dir} exists"):
            return bool(fs.exists(path))

    if not exists():
        if not config.wait_for_run:
            raise RunNotFoundError(
                f"save_dir {config.save_dir!r} does not exist: no run has written there. Check "
                "the path, or pass --wait-for-run (flow parameter wait_for_run) to wait up to "
                "--timeout seconds for a run to start there."
            )
        log(
            f"Waiting for a run to start writing {config.save_dir} (checking every "
            f"{config.poll_seconds:g}s, giving up after {config.timeout:g}s)."
        )
        deadline = time.monotonic() + config.timeout
        while not exists():
            if time.monotonic() + config.poll_seconds > deadline:
                raise RunNotFoundError(
                    f"no run appeared at {config.save_dir!r} within {config.timeout:g}s "
                    "(--timeout); check the path, or start the training run."
                )
            sleep(config.poll_seconds)
        log(f"{config.save_dir} appeared; following it.")
    assert_save_dir(config.save_dir, options)


class EvalResult(BaseModel):
    checkpoint: str
    step: int
    partition: str
    status: Literal["evaluated", "skipped"]
    metrics: dict[str, float] = {}
    metrics_path: str


class LoadedModel:
    """The model an evaluator keeps between checkpoints: built once per run segment.

    ``builds`` counts the models built (what a person, or a test, checks to see that an
    evaluator following a run did not rebuild its model for each checkpoint).
    """

    def __init__(self) -> None:
        self.builds = 0
        self._segment: RunSegment | None = None
        self._recipe: Recipe | None = None

    def for_segment(self, segment: RunSegment, log: Callable[[str], object]) -> Recipe:
        """The recipe (model, eval data) of ``segment``: the kept one, or a new one when the
        segment differs (a run resumed with changed parameters)."""
        if self._recipe is None or self._segment != segment:
            started = time.monotonic()
            self._recipe = load_recipe(segment.recipe)(segment.recipe_params())
            self._segment = segment
            self.builds += 1
            log(
                f"Built the model of {segment.recipe} (segment from step {segment.from_step}) "
                f"in {time.monotonic() - started:.2f}s; kept for the next checkpoints."
            )
        return self._recipe


def evaluate_checkpoint(
    config: EvalConfig,
    checkpoint: str,
    log: Callable[[str], object] = logger.info,
    model: LoadedModel | None = None,
) -> EvalResult:
    """Evaluate ``checkpoint`` on ``config.partition`` unless that is already done.

    ``model``: the evaluator's kept model (:class:`LoadedModel`); none: a model built for this
    checkpoint alone.
    """
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
    # The parameters that produced this checkpoint (a run resumed with a changed config has
    # several segments; see training.run_info).
    segment = read_run_info(config.save_dir, options).segment_for(step)
    recipe = (model or LoadedModel()).for_segment(segment, log)
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
