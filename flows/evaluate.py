"""The ``evaluate`` flow: follow a training run and evaluate every new checkpoint once.

It walks ``checkpoints_iterator`` (every committed checkpoint in step order, not just the
latest, so none written between two polls is skipped), evaluates each on the partition's
deterministic eval data in a fresh model, publishes the metrics as artifacts and next to the
checkpoint, and marks it done. It stops after the run's final checkpoint (from ``run.json``)
or after ``timeout`` seconds with nothing new. Restart-safe: done checkpoints are "Skipped".
A ``save_dir`` that does not exist fails at once unless ``wait_for_run`` (a typo would otherwise
wait silently for the whole timeout); while it waits, it says for what.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel

from tasks.evaluation import evaluate_checkpoint_task
from tasks.naming import artifact_key, experiment, flow_run_namer
from tml_checkpointing import checkpoints_iterator, step_from_checkpoint
from tml_checkpointing.filesystem import parent_url
from training.evaluation import EvalConfig, EvalResult, await_run
from training.run_info import RunInfoMissingError, read_run_info


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
    flow_run_name=flow_run_namer("evaluate", "save_dir", "partition"),
)
def evaluate(
    save_dir: str,
    partition: str = "validation",
    eval_steps: int = 10,
    timeout: float = 1800,
    poll_seconds: float = 10,
    storage_options: dict[str, Any] | None = None,
    wait_for_run: bool = False,
) -> EvalSummary:
    """Evaluate each committed checkpoint of ``save_dir`` on ``partition`` (in step order).

    Args:
        save_dir: The training run's checkpoint directory (path or fsspec URL) to follow.
        partition: Which data to evaluate on (``validation``, ``test``...); each partition's
            evaluator marks the checkpoints it finished, once each.
        eval_steps: Batches evaluated per checkpoint.
        timeout: Seconds to wait for a new checkpoint before giving up (the run may have
            ended).
        poll_seconds: Seconds between looks for new checkpoints.
        storage_options: Options for the fsspec filesystem of ``save_dir``.
        wait_for_run: Wait (up to ``timeout``) for a run to start in ``save_dir`` instead of
            failing at once when it does not exist yet.

    A ``save_dir`` that does not exist fails at once (``RunNotFoundError``) unless
    ``wait_for_run``.
    """
    config = EvalConfig(
        save_dir=save_dir,
        partition=partition,
        eval_steps=eval_steps,
        timeout=timeout,
        poll_seconds=poll_seconds,
        storage_options=storage_options,
        wait_for_run=wait_for_run,
    )
    return follow_and_evaluate(config)


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
        state = evaluate_checkpoint_task(config, checkpoint, step, return_state=True)
        result: EvalResult = state.result()
        results.append(result)
        if result.status == "evaluated":
            _publish_checkpoint_metrics(result)
        final_step = _final_step(config)
        if final_step is not None and step >= final_step:
            logger.info("Evaluated the run's final checkpoint (step %s); done.", step)
            break
        _log_wait(config, step, final_step)
    else:
        logger.warning("No new checkpoint for %ss; stopping (timeout).", config.timeout)
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


def _publish_checkpoint_metrics(result: EvalResult) -> None:
    create_table_artifact(
        key=artifact_key("eval", result.partition, experiment(parent_url(result.checkpoint))),
        table=[
            {"metric": name, "value": round(value, 6)}
            for name, value in sorted(result.metrics.items())
        ],
        description=f"{result.partition} metrics of {result.checkpoint}",
    )


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
