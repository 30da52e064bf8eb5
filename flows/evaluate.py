"""The ``evaluate`` flow: follow a training run and evaluate every new checkpoint once.

It walks ``checkpoints_iterator`` (every committed checkpoint in step order, not just the
latest, so none written between two polls is skipped), evaluates each on the partition's
deterministic eval data in a fresh model, publishes the metrics as artifacts and next to the
checkpoint, and marks it done. It stops after the run's final checkpoint (from ``run.json``)
or after ``timeout`` seconds with nothing new. Restart-safe: done checkpoints are "Skipped".
A ``save_dir`` that does not exist fails at once unless ``wait_for_run`` (a typo would otherwise
wait silently for the whole timeout); while it waits, it says for what.

Started by an event instead (the ``evaluate`` deployment's trigger on
``tml.checkpoint.committed``, ``checkpoint`` = the event's checkpoint), it evaluates that
checkpoint and every other committed one of the run not yet evaluated on the partition, then
stops: a burst of commits is taken by whichever run comes first, the others find it done.
After each evaluation the run's checkpoint table and loss curve get a new version.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel

from flows.reporting import publish_checkpoints
from tasks.evaluation import evaluate_checkpoint_task, one_evaluation_at_a_time
from tasks.naming import artifact_key, experiment, flow_run_namer, tag_run_with_experiment
from tml_checkpointing import (
    checkpoints_iterator,
    is_committed,
    is_done_eval,
    list_checkpoints,
    step_from_checkpoint,
)
from training.evaluation import EvalConfig, EvalParams, EvalResult, await_run
from training.run_info import RunInfoMissingError, read_run_info

DEFAULT_PARAMS = EvalParams()  # frozen: one shared default


class EvalSummary(BaseModel):
    save_dir: str
    partition: str
    evaluated: list[int]
    skipped: list[int]
    final_step: int | None
    reached_final: bool
    results: list[EvalResult]


@flow(
    name="evaluate",
    flow_run_name=flow_run_namer(
        "evaluate", "save_dir", "params.partition", checkpoint_parameter="checkpoint"
    ),
)
def evaluate(
    save_dir: str, params: EvalParams = DEFAULT_PARAMS, checkpoint: str | None = None
) -> EvalSummary:
    """Evaluate each committed checkpoint of ``save_dir`` on a partition (in step order).

    ``save_dir`` and ``checkpoint`` stay flat parameters: they are what the deployment's
    trigger passes, while the deployment's ``params`` (partition, waiting...) stay its own.
    A ``save_dir`` that does not exist fails at once (``RunNotFoundError``) unless
    ``params.wait_for_run``.

    Args:
        save_dir: The training run's checkpoint directory (path or fsspec URL) to follow.
        params: How to evaluate and follow it (training.evaluation.EvalParams).
        checkpoint: Set by the deployment's trigger from a ``tml.checkpoint.committed``
            event: evaluate this checkpoint and any other of ``save_dir`` not evaluated yet
            on the partition, then stop (no following, no waiting). Empty: follow the run.
    """
    config = EvalConfig(**params.model_dump(), save_dir=save_dir)
    tag_run_with_experiment(save_dir)
    if checkpoint:
        return evaluate_pending(config, checkpoint)
    return follow_and_evaluate(config)


def evaluate_pending(config: EvalConfig, trigger: str) -> EvalSummary:
    """Evaluate ``trigger`` and every other committed checkpoint of the run that the partition
    has not evaluated, oldest first (what an event-started run does)."""
    logger = get_run_logger()
    options = config.storage_options
    logger.info("Started for %s on %s", trigger, config.partition)
    if not is_committed(trigger, options):
        logger.warning("%s is no longer committed (pruned?); evaluating the others.", trigger)
    with one_evaluation_at_a_time(config, log=logger.info):  # the done-checks too
        results = [
            _evaluate(config, candidate.path)
            for candidate in list_checkpoints(config.save_dir, options)
            if candidate.path == trigger
            or not is_done_eval(candidate.path, config.partition, storage_options=options)
        ]
    return _summarize(config, results, _final_step(config))


def follow_and_evaluate(config: EvalConfig) -> EvalSummary:
    logger = get_run_logger()
    await_run(config, log=logger.info)
    results: list[EvalResult] = []
    final_step = _final_step(config)
    _log_wait(config, None, final_step)
    for checkpoint in checkpoints_iterator(
        config.save_dir,
        seconds_to_sleep=config.poll_seconds,
        timeout=config.timeout,
        storage_options=config.storage_options,
    ):
        step = step_from_checkpoint(checkpoint)
        with one_evaluation_at_a_time(config, log=logger.info):
            results.append(_evaluate(config, checkpoint))
        final_step = _final_step(config)
        if final_step is not None and step >= final_step:
            logger.info("Evaluated the run's final checkpoint (step %s); done.", step)
            break
        _log_wait(config, step, final_step)
    else:
        logger.warning("No new checkpoint for %ss; stopping (timeout).", config.timeout)
    return _summarize(config, results, final_step)


def _evaluate(config: EvalConfig, checkpoint: str) -> EvalResult:
    """One checkpoint through the task (the caller holds the evaluation slot); a new version of
    the run's table when evaluated."""
    step = step_from_checkpoint(checkpoint)
    result: EvalResult = evaluate_checkpoint_task(
        config, checkpoint, step, return_state=True
    ).result()
    if result.status == "evaluated":
        moment = f"after the {config.partition} evaluation of step {step}"
        publish_checkpoints(config.save_dir, config.storage_options, moment=moment)
    return result


def _summarize(
    config: EvalConfig, results: list[EvalResult], final_step: int | None
) -> EvalSummary:
    summary = EvalSummary(
        save_dir=config.save_dir,
        partition=config.partition,
        evaluated=[r.step for r in results if r.status == "evaluated"],
        skipped=[r.step for r in results if r.status == "skipped"],
        final_step=final_step,
        reached_final=bool(results) and final_step is not None and results[-1].step >= final_step,
        results=results,
    )
    _publish_summary(summary)
    return summary


def _log_wait(config: EvalConfig, after_step: int | None, final_step: int | None) -> None:
    """Say what the evaluator waits for next (it may wait up to ``timeout`` s for it)."""
    get_run_logger().info(
        "Waiting for checkpoints of %s%s (run's final step: %s); stopping after %ss without a "
        "new one.",
        config.save_dir,
        "" if after_step is None else f" after step {after_step}",
        "unknown, no run.json yet" if final_step is None else final_step,
        f"{config.timeout:g}",
    )


def _final_step(config: EvalConfig) -> int | None:
    try:
        return read_run_info(config.save_dir, config.storage_options).final_step
    except RunInfoMissingError:
        return None


def _publish_summary(summary: EvalSummary) -> None:
    rows = "\n".join(
        f"| {r.step} | {r.status} | {r.metrics.get('loss', float('nan')):.4f} "
        f"| `{r.metrics_path}` |"
        for r in summary.results
    )
    create_markdown_artifact(
        key=artifact_key("eval-summary", summary.partition, experiment(summary.save_dir)),
        markdown=(
            f"# Evaluation of `{summary.save_dir}` on `{summary.partition}`\n\n"
            f"Reached the final checkpoint: {summary.reached_final}\n\n"
            "| step | status | loss | metrics |\n|---|---|---|---|\n" + rows + "\n"
        ),
        description=f"{summary.partition} evaluation summary",
    )
