"""The ``evaluate`` flow: evaluate every committed checkpoint of a run once per partition.

Two ways to run it:

- **Started by an event** (the ``evaluate`` deployment's trigger on ``tml.checkpoint.committed``,
  ``checkpoint`` = the event's checkpoint): it evaluates that checkpoint and every other one of
  the run still pending on the partition, then *keeps its model loaded and follows the run*
  (Prefect's event stream wakes it at each commit, :mod:`flows.evaluate_follow`) until the
  run's final step is evaluated or ``follow_seconds`` pass with nothing new.
- **By hand** (no ``checkpoint``; ``tml evaluate``): it polls ``save_dir`` (every committed
  checkpoint in step order, none skipped between two polls) until the run's final checkpoint,
  or ``timeout`` seconds with nothing new.

Why an event-started run follows instead of stopping: each event used to start a fresh
process that imported torch and rebuilt the model (48-76 s from commit to metrics under a
burst, 8 processes at once on 2 cores). Now the first run of a burst pays that once; each later
commit of the run is evaluated by it as soon as the event arrives (a restore into the kept
model, the evaluation, a new table version: no process start, import or model build), and the
other runs the burst started find their checkpoint done -- or wait a few seconds for the
follower to do it -- and end, saying which run evaluated it. How many of those
processes run at once is bounded by the deployment's ``concurrency_limit`` in ``prefect.yaml``
(collision strategy ENQUEUE: a run over the limit waits; CANCEL_NEW could drop the run of the
final checkpoint). A run waiting for its checkpoint does not wait for the follower to *end*
(that can be a whole training run), only for the checkpoint to be done: its deployment slot is
back within seconds.

Exactly once: done-markers are checked and checkpoints evaluated only while holding the one
slot of ``tml-eval-<experiment>-<partition>`` (:mod:`tasks.eval_limits`, which also removes it
once the experiment's final checkpoint is evaluated). A ``save_dir`` that does not exist fails
at once unless ``wait_for_run``.

What a run did is in its name and final state message (``evaluate · exp · validation · steps
5-30`` with an en dash, or ``... · nothing to do: step 5 was evaluated by "steps 5-30"``,
the name of the run that did, less what both names share); the
summary artifact ``eval-summary-<partition>-<exp>`` is rebuilt from storage by runs that
evaluated something (:mod:`training.eval_status`), so its newest version is always right.
"""

from __future__ import annotations

import time
from typing import cast
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.runtime import flow_run
from prefect.states import Completed
from pydantic import BaseModel

from flows.comparison import publish_comparison_around
from flows.evaluate_follow import CommitWatcher
from flows.reporting import publish_checkpoints
from tasks.eval_events import announce_evaluated, log_trigger, who_evaluated
from tasks.eval_limits import (
    SlotBusyError,
    evaluation_limit_name,
    evaluation_slot,
    remove_limit,
    slot_is_taken,
)
from tasks.evaluation import evaluate_checkpoint_task
from tasks.naming import artifact_key, flow_run_namer, tag_run_with_experiment
from tml_checkpointing import (
    checkpoints_iterator,
    is_committed,
    is_done_eval,
    list_checkpoints,
    step_from_checkpoint,
)
from tml_checkpointing.storage.filesystem import invalidate_listing, resolve
from training.eval_status import EvalStatus, describe_steps, eval_status, final_step
from training.evaluation import EvalConfig, EvalParams, EvalResult, LoadedModel, await_run
from training.run_info import experiment_of

DEFAULT_PARAMS = EvalParams()  # frozen: one shared default

HANDOVER_POLL_S = 1.0
"""While another evaluator holds the slot: how often a run looks at its checkpoint's
done-marker (and whether the slot is free)."""
HANDOVER_WAIT_S = 5.0
"""How long a run waits for a slot that looked free (another run may take it first)."""


class EvalSummary(BaseModel):
    """What one evaluate run did (``evaluated``, ``skipped``: found done), and where the
    partition's evaluation of the run stands at its end (from storage)."""

    save_dir: str
    partition: str
    experiment: str
    evaluated: list[int]
    skipped: list[int]
    pending: list[int]
    final_step: int | None
    reached_final: bool
    model_builds: int
    title: str
    evaluated_by: str | None = None
    results: list[EvalResult]


class _Run:
    """One evaluate flow run: its config, experiment, kept model and what it did."""

    def __init__(
        self,
        config: EvalConfig,
        experiment: str,
        event_id: str | None,
        train_flow_run_id: str | None,
    ) -> None:
        self.config = config
        self.experiment = experiment
        self.event_id = event_id
        self.train_flow_run_id = train_flow_run_id
        self.limit = evaluation_limit_name(experiment, config.partition)
        self.model = LoadedModel()
        self.results: list[EvalResult] = []
        self.logger = get_run_logger()

    @property
    def evaluated(self) -> list[int]:
        return [r.step for r in self.results if r.status == "evaluated"]

    def evaluate(self, checkpoint: str) -> EvalResult:
        """One checkpoint through the task (the caller holds the slot); a new version of the
        run's table when evaluated, and ``tml.checkpoint.evaluated``."""
        config, step = self.config, step_from_checkpoint(checkpoint)
        result: EvalResult = evaluate_checkpoint_task(
            config, checkpoint, step, self.model, return_state=True
        ).result()
        self.results.append(result)
        if result.status == "evaluated":
            # Named after what it did so far: a run that finds its checkpoint done names this
            # one while it may still be following.
            committed = _committed_steps(config)
            _rename(
                f"evaluate · {self.experiment} · {config.partition} · "
                + describe_steps(self.evaluated, committed)
            )
            publish_checkpoints(
                config.save_dir,
                config.storage_options,
                experiment=self.experiment,
                moment=f"after the {config.partition} evaluation of step {step}",
            )
            announce_evaluated(
                checkpoint=checkpoint,
                step=step,
                experiment=self.experiment,
                save_dir=config.save_dir,
                partition=config.partition,
                metrics=result.metrics,
                event_id=self.event_id,
                train_flow_run_id=self.train_flow_run_id,
            )
        return result

    def pending(self) -> list[str]:
        """Committed checkpoints not evaluated on the partition, oldest first (a fresh listing:
        other processes commit)."""
        config = self.config
        fs, path = resolve(config.save_dir, config.storage_options)
        invalidate_listing(fs, path)
        done = set(self.evaluated)
        return [
            c.path
            for c in list_checkpoints(config.save_dir, config.storage_options)
            if c.step not in done
            and not is_done_eval(c.path, config.partition, storage_options=config.storage_options)
        ]

    def final_is_evaluated(self) -> bool:
        final = final_step(self.config.save_dir, self.config.storage_options)
        if final is None:
            return False
        if final in self.evaluated:
            return True
        return any(
            c.step == final
            and is_done_eval(
                c.path, self.config.partition, storage_options=self.config.storage_options
            )
            for c in list_checkpoints(self.config.save_dir, self.config.storage_options)
        )

    def release_limit_if_finished(self) -> None:
        """Holding the slot: remove the limit once the final checkpoint is evaluated."""
        if self.final_is_evaluated() and remove_limit(self.limit):
            self.logger.info(
                "The run's final checkpoint is evaluated on %s: removed %s (an evaluator that "
                "still needs it creates it again).",
                self.config.partition,
                self.limit,
            )


@flow(
    name="evaluate",
    flow_run_name=flow_run_namer(
        "evaluate",
        "save_dir",
        "params.partition",
        experiment_parameter="experiment",
        checkpoint_parameter="checkpoint",
    ),
)
def evaluate(
    save_dir: str,
    params: EvalParams = DEFAULT_PARAMS,
    checkpoint: str | None = None,
    experiment: str | None = None,
    event_id: str | None = None,
    train_flow_run_id: str | None = None,
) -> EvalSummary:
    """Evaluate each committed checkpoint of ``save_dir`` on a partition (in step order).

    ``save_dir``, ``checkpoint``, ``experiment``, ``event_id`` and ``train_flow_run_id`` are
    flat parameters: they are what the deployment's trigger passes, while the deployment's
    ``params`` (partition, following...) stay its own. Called directly, it returns the
    :class:`EvalSummary`; its final state's message says what it did.

    Args:
        save_dir: The training run's checkpoint directory (path or fsspec URL) to evaluate.
        params: How to evaluate and follow it (training.evaluation.EvalParams).
        checkpoint: Set by the deployment's trigger from a ``tml.checkpoint.committed``
            event: evaluate this checkpoint and every other pending one, then follow the run's
            new commits with the model kept loaded (params.follow_seconds). Empty: follow the
            run by polling (params.poll_seconds, params.timeout).
        experiment: The run's experiment name (the trigger passes the event's); empty: the
            one its run.json records, else derived from save_dir. Another name than the
            recorded one is refused.
        event_id: The id of the event that started this run (set by the trigger; linked from
            the run's first log line and its tml.checkpoint.evaluated events).
        train_flow_run_id: The training flow run that committed the checkpoint (set by the
            trigger from the event's payload; linked the same way).
    """
    logger = get_run_logger()
    given = experiment or None  # the trigger renders a payload without one as ""
    config = EvalConfig(**params.model_dump(), save_dir=save_dir, experiment=given)
    if checkpoint:
        log_trigger(logger, checkpoint, event_id, train_flow_run_id)
    else:
        await_run(config, log=logger.info)
    name = experiment_of(save_dir, config.storage_options, given)
    config = config.model_copy(update={"experiment": name})
    tag_run_with_experiment(name)
    run = _Run(config, name, event_id, train_flow_run_id)
    return _completed(_started_by_event(run, checkpoint) if checkpoint else _follow_by_polling(run))


def _started_by_event(run: _Run, trigger: str) -> EvalSummary:
    """Evaluate what is pending and follow, holding the slot; or, while another evaluator
    holds it, wait until ``trigger`` is done (never for that evaluator to end)."""
    config, step = run.config, step_from_checkpoint(trigger)
    options = config.storage_options
    said_waiting = False
    while True:
        if is_done_eval(trigger, config.partition, storage_options=options):
            who = who_evaluated(run.experiment, config.partition, step)
            return _finish(run, _done_by(run, step, who), skipped=[step], by=who)
        if not is_committed(trigger, options) and said_waiting:
            return _finish(run, f"nothing to do: step {step} is no longer committed")
        if not slot_is_taken(run.limit):
            try:
                with evaluation_slot(run.limit, timeout_seconds=HANDOVER_WAIT_S):
                    return _evaluate_and_follow(run, trigger)
            except SlotBusyError:
                pass  # taken between the look and the try
        if not said_waiting:
            run.logger.info(
                "%s is held by another evaluator of this experiment: waiting for it to "
                "evaluate step %s (or to free the slot).",
                run.limit,
                step,
            )
            said_waiting = True
        time.sleep(HANDOVER_POLL_S)  # another process writes the marker: nothing to await


def _evaluate_and_follow(run: _Run, trigger: str) -> EvalSummary:
    """Holding the slot: everything pending, then each new commit, in one process and model."""
    config = run.config
    if not is_committed(trigger, config.storage_options):
        run.logger.warning("%s is no longer committed (pruned?); evaluating the others.", trigger)
    with CommitWatcher(config.save_dir) as watcher:  # subscribed before the first listing
        last_new = time.monotonic()
        while True:
            pending = run.pending()
            for checkpoint in pending:
                run.evaluate(checkpoint)
            if pending:
                last_new = time.monotonic()
            if run.final_is_evaluated():
                run.logger.info("The run's final checkpoint is evaluated; done.")
                break
            if not run.evaluated:
                break  # someone else evaluated everything: nothing to follow for
            left = config.follow_seconds - (time.monotonic() - last_new)
            if left <= 0:
                run.logger.info(
                    "No new checkpoint of %s for %ss; stopping (follow_seconds).",
                    config.save_dir,
                    f"{config.follow_seconds:g}",
                )
                break
            if not pending:
                run.logger.info(
                    "Following %s for new checkpoints (model kept loaded; stopping after %ss "
                    "without one).",
                    config.save_dir,
                    f"{config.follow_seconds:g}",
                )
            watcher.wait(min(left, config.poll_seconds))
    run.release_limit_if_finished()
    if run.evaluated:
        return _finish(run, describe_steps(run.evaluated, _committed_steps(config)))
    step = step_from_checkpoint(trigger)
    who = who_evaluated(run.experiment, config.partition, step)
    return _finish(run, _done_by(run, step, who), skipped=[step], by=who)


def _done_by(run: _Run, step: int, who: str | None) -> str:
    """``nothing to do: step 5 was evaluated by "steps 5-30"``: the run that did it, by the
    part of its name after what both names share (experiment and partition), so the runs list
    shows it whole."""
    if who is None:
        return f"nothing to do: step {step} was already evaluated"
    shared = f"evaluate · {run.experiment} · {run.config.partition} · "
    shown = f'"{who.removeprefix(shared)}"' if who.startswith(shared) else who
    return f"nothing to do: step {step} was evaluated by {shown}"


def _follow_by_polling(run: _Run) -> EvalSummary:
    """The run by hand: each committed checkpoint in step order, the slot taken per checkpoint
    (an event-started evaluator may run beside)."""
    config, logger = run.config, run.logger
    skipped: list[int] = []
    final = final_step(config.save_dir, config.storage_options)
    _log_wait(config, None, final)
    for checkpoint in checkpoints_iterator(
        config.save_dir,
        seconds_to_sleep=config.poll_seconds,
        timeout=config.timeout,
        storage_options=config.storage_options,
    ):
        step = step_from_checkpoint(checkpoint)
        with evaluation_slot(run.limit, log=logger.info):
            if run.evaluate(checkpoint).status == "skipped":
                skipped.append(step)
            run.release_limit_if_finished()
        final = final_step(config.save_dir, config.storage_options)
        if final is not None and step >= final:
            logger.info("Evaluated the run's final checkpoint (step %s); done.", step)
            break
        _log_wait(config, step, final)
    else:
        logger.warning("No new checkpoint for %ss; stopping (timeout).", config.timeout)
    committed = _committed_steps(config)
    if run.evaluated:
        title = describe_steps(run.evaluated, committed)
    elif skipped:
        title = f"nothing to do: {describe_steps(skipped, committed)} already evaluated"
    else:
        title = f"nothing to do: no checkpoint within {config.timeout:g}s"
    return _finish(run, title, skipped=skipped)


def _committed_steps(config: EvalConfig) -> list[int]:
    return [c.step for c in list_checkpoints(config.save_dir, config.storage_options)]


def _finish(
    run: _Run, title: str, skipped: list[int] | None = None, by: str | None = None
) -> EvalSummary:
    """Say what the run did: its name, the summary artifact (only when it evaluated
    something: see the module's docstring), and the summary returned."""
    config = run.config
    status = eval_status(config.save_dir, config.partition, config.storage_options)
    title = f"{config.partition} · {title}"
    summary = EvalSummary(
        save_dir=config.save_dir,
        partition=config.partition,
        experiment=run.experiment,
        evaluated=run.evaluated,
        skipped=sorted(set(skipped or []) | {r.step for r in run.results if r.status == "skipped"}),
        pending=status.pending,
        final_step=status.final_step,
        reached_final=status.final_evaluated,
        model_builds=run.model.builds,
        title=title,
        evaluated_by=by,
        results=run.results,
    )
    if run.evaluated:
        _publish_summary(run.experiment, status)
        publish_comparison_around(
            config.save_dir,
            config.storage_options,
            moment=f"after the {config.partition} evaluation of {run.experiment}",
        )
    _rename(f"evaluate · {run.experiment} · {title}")
    run.logger.info("%s (model built %s time(s)).", title, run.model.builds)
    return summary


def _completed(summary: EvalSummary) -> EvalSummary:
    """The run's final state: Completed with what it did as its message (shown beside the
    state in the UI). Prefect hands a direct caller the state's data, the summary itself."""
    return cast(EvalSummary, Completed(message=summary.title, data=summary))


def _rename(name: str) -> None:
    """Give the running flow run ``name`` (best effort: a run is not failed for its name)."""
    run_id = flow_run.get_id()
    if not run_id:
        return
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(UUID(run_id), name=name)
    except Exception as error:  # the API is the only thing that can fail here
        get_run_logger().warning("Run not renamed to %r: %s", name, error)


def _log_wait(config: EvalConfig, after_step: int | None, final: int | None) -> None:
    """Say what the evaluator waits for next (it may wait up to ``timeout`` s for it)."""
    get_run_logger().info(
        "Waiting for checkpoints of %s%s (run's final step: %s); stopping after %ss without a "
        "new one.",
        config.save_dir,
        "" if after_step is None else f" after step {after_step}",
        "unknown, no run.json yet" if final is None else final,
        f"{config.timeout:g}",
    )


def _publish_summary(experiment: str, status: EvalStatus) -> None:
    """``eval-summary-<partition>-<exp>``: every committed checkpoint, evaluated or pending."""
    rows = "\n".join(
        f"| {c.step} | {c.status} | "
        + (f"{c.metrics['loss']:.4f}" if "loss" in c.metrics else "")
        + f" | `{c.checkpoint}` |"
        for c in status.checkpoints
    )
    final = "unknown (no run.json)" if status.final_step is None else str(status.final_step)
    pending = ", ".join(map(str, status.pending)) or "none"
    create_markdown_artifact(
        key=artifact_key("eval-summary", status.partition, experiment),
        markdown=(
            f"# Evaluation of `{status.save_dir}` on `{status.partition}`\n\n"
            f"Reached the final checkpoint: {status.final_evaluated} (final step {final})\n\n"
            f"Evaluated {len(status.evaluated)} of {len(status.checkpoints)} committed "
            f"checkpoints; pending: {pending}\n\n"
            "| step | status | loss | checkpoint |\n|---|---|---|---|\n" + rows + "\n"
        ),
        description=f"{status.partition} evaluation of {experiment}: every committed "
        "checkpoint, evaluated or pending",
    )
