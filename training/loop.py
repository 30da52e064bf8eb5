"""One training epoch as a plain function: resume-aware, deterministic, checkpointing.

Global steps count from 1; epoch ``e`` covers steps ``e*K+1 .. (e+1)*K`` (K = steps per
epoch) and always ends with a committed checkpoint at ``(e+1)*K``. Batch ``i`` of epoch ``e``
is ``recipe.train_batch(e, i)``, a pure function of (seed, epoch, index), and the RNG state is
in every checkpoint, so a run resumed from any checkpoint continues bit for bit as an
uninterrupted one. On a preemption signal (see ``PreemptionGuard``) the step in progress is
finished, checkpointed, and ``PreemptedError`` raised.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import BaseModel

from tml_checkpointing import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    PreemptionGuard,
    RetentionPolicy,
    join_url,
    prune,
    read_checkpoint_metrics,
    save_final_checkpoint,
    step_from_checkpoint,
    write_checkpoint_metrics,
)

from .collective import any_rank, is_primary
from .config import TrainConfig
from .determinism import settle_vector_math
from .session import TrainingSession
from .step_losses import write_step_losses

logger = logging.getLogger(__name__)


class InjectedFailure(RuntimeError):
    """Raised once per process at ``fail_at_step``, to demonstrate retries."""


class EpochResult(BaseModel):
    """What a training epoch reports (small: goes through Prefect as a task result)."""

    epoch: int
    status: Literal["trained", "skipped"]
    checkpoint: str
    first_step: int
    last_step: int
    resumed_from_step: int
    steps_run: int = 0
    mean_loss: float | None = None
    steps_per_second: float | None = None
    seconds: float = 0.0
    attempt: int = 1  # which attempt of the epoch's task trained it (a retry shows as 2, 3...)


def train_epoch(
    session: TrainingSession, epoch: int, log: Callable[[str], object] = logger.info
) -> EpochResult:
    """Train ``epoch`` from wherever the checkpoint directory says it stands.

    Skips at once (without restoring anything) when a checkpoint at or past the epoch's end
    is already committed; otherwise restores the newest checkpoint unless the in-memory state
    is exactly it, trains the remaining steps and returns once the epoch's final checkpoint is
    committed.
    """
    config = session.config
    first, last = config.epoch_steps(epoch)
    checkpoint = join_url(config.save_dir, str(last))
    latest = session.latest_checkpoint()
    latest_step = step_from_checkpoint(latest) if latest else 0
    if latest_step >= last:
        log(f"epoch {epoch}: skipped, checkpoint at step {latest_step} covers steps {first}-{last}")
        # The epoch's loss as the run that trained it recorded it (gone if pruned).
        recorded = read_checkpoint_metrics(checkpoint, storage_options=config.storage_options)
        return EpochResult(
            epoch=epoch,
            status="skipped",
            checkpoint=checkpoint,
            first_step=first,
            last_step=last,
            resumed_from_step=latest_step,
            mean_loss=recorded.get(EPOCH_LOSS),
        )

    settle_vector_math()  # in the thread that trains (a Prefect task's, a rank's main thread)
    resumed_from = session.sync_with_storage(latest)
    # Normally resumed_from >= first - 1 (the previous epoch ended committed). It is older when
    # the restore found the newest checkpoint corrupt and fell back: then the steps in between
    # are trained here too, each with its own epoch's batch, so no step is ever skipped.
    start = resumed_from + 1
    if start < first:
        log(f"epoch {epoch}: catching up from step {start} (fell back to step {resumed_from})")
    model, optimizer, snapshot = session.recipe.model, session.recipe.optimizer, session.snapshot
    model.train()
    losses: list[float] = []  # of steps start, start + 1, ...: in memory until a save
    saved: dict[int, dict[str, float]] = {}  # this epoch's checkpoints and their metrics
    started = accounted = time.perf_counter()

    def account_walltime() -> None:
        """Add the time since the last account to the snapshot's walltime (each interval
        once: a mid-epoch save must not count the epoch's earlier part again)."""
        nonlocal accounted
        now = time.perf_counter()
        snapshot.walltime += now - accounted
        accounted = now

    session.synced_step = None  # from here on, memory is ahead of storage
    session.pristine = False
    try:
        for step in range(start, last + 1):
            _maybe_inject_failure(session, step)
            step_epoch = config.epoch_of_step(step)
            step_first, step_last = config.epoch_steps(step_epoch)
            batch = session.recipe.train_batch(step_epoch, step - step_first)
            optimizer.zero_grad(set_to_none=True)
            loss = session.recipe.loss(model, batch)
            torch.autograd.backward(loss)  # = loss.backward(), which torch leaves untyped
            optimizer.step()
            losses.append(loss.item())
            guard = session.preemption
            if any_rank(guard is not None and guard.requested):  # every rank stops here
                account_walltime()
                _note_metrics(session, saved, step, losses)
                save_final_checkpoint(snapshot, step, guard or PreemptionGuard())  # raises
            every = config.checkpoint_every_steps
            if step < last and (step == step_last or (every and step % every == 0)):
                account_walltime()
                _note_metrics(session, saved, step, losses)
                snapshot.save(step)  # mid-epoch, or an earlier epoch's end while catching up
                log(f"epoch {epoch}: saving mid-epoch checkpoint at step {step}")
        account_walltime()
        _note_metrics(session, saved, last, losses, epoch_loss=sum(losses) / len(losses))
        snapshot.save(last)
        snapshot.wait()
        if is_primary():
            _record_metrics(session, saved, losses)
            _apply_retention(session)
    except BaseException:
        _drain_pending_save(session)
        if is_primary():  # what this attempt committed before it failed keeps its metrics
            _record_metrics(session, saved, losses)
        raise
    session.synced_step = last
    seconds = time.perf_counter() - started
    result = EpochResult(
        epoch=epoch,
        status="trained",
        checkpoint=checkpoint,
        first_step=first,
        last_step=last,
        resumed_from_step=resumed_from,
        steps_run=len(losses),
        mean_loss=sum(losses) / len(losses),
        steps_per_second=len(losses) / seconds if seconds > 0 else None,
        seconds=seconds,
    )
    log(
        f"epoch {epoch}: steps {start}-{last} loss {result.mean_loss:.4f} "
        f"{result.steps_per_second or 0:.1f} steps/s -> {checkpoint}"
        + (f" (resumed from step {resumed_from})" if resumed_from >= first else "")
    )
    return result


EPOCH_LOSS = "epoch_loss"
"""Key, in the metrics of an epoch's final checkpoint, of the epoch's mean training loss (as
far as this process trained it): what a resumed run shows for the epoch it skips."""


def _note_metrics(
    session: TrainingSession,
    saved: dict[int, dict[str, float]],
    step: int,
    losses: list[float],
    epoch_loss: float | None = None,
) -> None:
    """The training metrics of the checkpoint about to be saved at ``step``: the mean loss of
    the steps since the previous save, and the attempt that trained them (each of those steps'
    own loss is written beside the checkpoint by :func:`_record_metrics`)."""
    interval = losses[sum(int(m["train_steps"]) for m in saved.values()) :]
    metrics = {
        "train_loss": sum(interval) / len(interval),
        "train_steps": float(len(interval)),
        "train_attempt": float(session.attempt),
    }
    if epoch_loss is not None:
        metrics[EPOCH_LOSS] = epoch_loss
    saved[step] = metrics
    session.checkpoint_metrics[step] = metrics


def _record_metrics(
    session: TrainingSession, saved: dict[int, dict[str, float]], losses: list[float]
) -> None:
    """Write each committed checkpoint's training metrics next to it (``metrics.json``, read
    by tables and ``keep_best``) and the loss of each step it covers (``train_losses.json``,
    for step-level curves): two small files per checkpoint, none per step. ``losses`` are
    this attempt's, one per step up to the newest save. Informational: a failure is logged,
    training goes on; a save that did not commit (its attempt failed) has no checkpoint to
    record them for."""
    config = session.config
    end = 0  # saves are noted in step order, each covering the steps after the one before
    for step, metrics in saved.items():
        covered = int(metrics["train_steps"])
        interval, end = losses[end : end + covered], end + covered
        checkpoint = join_url(config.save_dir, str(step))
        try:
            write_checkpoint_metrics(checkpoint, metrics, storage_options=config.storage_options)
            write_step_losses(
                checkpoint, step - covered + 1, interval, storage_options=config.storage_options
            )
        except CheckpointNotFoundError:
            continue
        except CheckpointError as error:
            logger.warning("Training metrics of %s not recorded: %s", checkpoint, error)


def _apply_retention(session: TrainingSession) -> None:
    """Prune after a committed, waited-for save: never the newest valid checkpoint, never
    one still being written, never one an awaited evaluator has not finished."""
    config = session.config
    if not config.keep_last:
        return
    policy = RetentionPolicy(
        keep_last=config.keep_last,
        keep_every_steps=config.keep_every_steps,
        keep_until_evaluated=list(config.wait_for_evaluators),
    )
    prune(config.save_dir, policy, storage_options=config.storage_options)


_injected_failures: set[tuple[str, int]] = set()


def _maybe_inject_failure(session: TrainingSession, step: int) -> None:
    """Fail once per process and run: task retries and flow retries then get through."""
    key = (session.config.save_dir, step)
    if session.config.fail_at_step == step and key not in _injected_failures:
        _injected_failures.add(key)
        raise InjectedFailure(f"injected failure at step {step} (fail_at_step)")


def claim_injected_failure(config: TrainConfig, epoch: int) -> bool:
    """Whether ``fail_at_step`` should fire in ``epoch`` (launched on ranks): once per run and
    launching process, like :func:`_maybe_inject_failure` in one process, so the retry passes."""
    step = config.fail_at_step
    first, last = config.epoch_steps(epoch)
    if step is None or not first <= step <= last or (config.save_dir, step) in _injected_failures:
        return False
    _injected_failures.add((config.save_dir, step))
    return True


def _drain_pending_save(session: TrainingSession) -> None:
    """Let an in-flight save finish (or fail) so a retry sees a settled directory."""
    try:
        session.snapshot.wait()
    except CheckpointWriteError as error:
        logger.warning("A pending save failed while handling another error: %s", error)
