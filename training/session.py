"""The in-process training state of one run, and its agreement with the checkpoint directory.

Prefect tasks receive config and return small results; the model and optimizer live here, in
the process, looked up by the run's config. The checkpoint directory is the one source of
truth: a session knows at which committed step its in-memory state is exact
(``synced_step``), and anything else -- a fresh process, a task retry after a failure
half-way through an epoch -- restores the newest checkpoint that verifies first.

The model is built on first use, not with the session. A run with several ranks trains in
``torchrun``'s processes, each building its part of a sharded model; its flow process keeps a
session for the run's bookkeeping only (segment start, attempt, preemption guard, announced
metrics) and must never build the whole model, which may not fit one machine. Each rank
checks, before it restores, that the checkpoint fits its part (:meth:`sync_with_storage`).
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from torchsnapshot import RNGState

from recipes.base import Recipe, load_recipe
from recipes.process_group import is_distributed
from tml_checkpointing import (
    CheckpointError,
    CheckpointShapeMismatchError,
    CorruptCheckpointError,
    PreemptionGuard,
    Snapshot,
    get_latest_valid_checkpoint,
    list_checkpoints,
    quarantine_checkpoint,
    step_from_checkpoint,
)
from tml_checkpointing.reading.shapes import check_checkpoint_fits
from tml_checkpointing.snapshot import EXTRA_STATE

from .collective import decided_by_rank0, is_primary
from .config import TrainConfig

logger = logging.getLogger(__name__)


class PeerRankCheckError(CheckpointError, RuntimeError):
    """Another rank could not check the checkpoint every rank was about to restore (its
    manifest did not read there). Raised on the ranks whose own check passed, so that none
    goes on to restore alone and waits for the others in a collective. Retryable: the
    reading rank's own error names the fault."""


@dataclass
class _Built:
    """What the recipe built: the state a run trains and its Snapshot."""

    recipe: Recipe
    snapshot: Snapshot
    hyperparameters: list[dict[str, Any]]  # each optimizer group's, as built (not "params")


class TrainingSession:
    """Model, optimizer and Snapshot of one run, built from its recipe on first use."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.synced_step: int | None = None
        self.pristine = True  # state is exactly what the recipe built (nothing trained yet)
        self.preemption: PreemptionGuard | None = None  # set by the flow, checked every step
        # First step trained with this config (run.json's current segment; set at the start):
        # a checkpoint before it was written under other parameters.
        self.config_from_step = 1
        # Which attempt of its epoch task is running (set by the task; 1 outside Prefect):
        # recorded with each checkpoint's training metrics, so a retry shows in the tables.
        self.attempt = 1
        # Training metrics of each checkpoint this process saved, by step (train_loss, ...):
        # what the checkpoint's Prefect event carries (written next to it as well).
        self.checkpoint_metrics: dict[int, dict[str, float]] = {}
        self._built: _Built | None = None  # see the module docstring: built on first use

    @property
    def recipe(self) -> Recipe:
        """The run's model, optimizer and data (built by the recipe now, if not yet)."""
        return (self._built or self._build()).recipe

    @property
    def snapshot(self) -> Snapshot:
        """The Snapshot over the run's state (building it now, if not yet)."""
        return (self._built or self._build()).snapshot

    @property
    def is_built(self) -> bool:
        """Whether this process built the run's model (a flow with ranks never does)."""
        return self._built is not None

    def _build(self) -> _Built:
        self.pristine = True
        recipe = load_recipe(self.config.recipe)(self.config.recipe_params())
        snapshot = Snapshot(
            self.config.save_dir,
            {"model": recipe.model, "optimizer": recipe.optimizer, "rng": RNGState()},
            storage_options=self.config.storage_options,
            incremental=self.config.incremental,
            full_every=self.config.full_every,
            min_chained_bytes=self.config.incremental_min_bytes,
            # The loop changes model and optimizer only through backward and step, which
            # the Snapshot holds while its copy runs: save() costs training no copy time.
            background_staging=True,
        )
        hyperparameters = [
            copy.deepcopy({key: value for key, value in group.items() if key != "params"})
            for group in recipe.optimizer.param_groups
        ]
        self._built = _Built(recipe, snapshot, hyperparameters)
        return self._built

    def _apply_built_hyperparameters(self, checkpoint: str) -> None:
        """A checkpoint from before a config change (``--allow-changed-config``) restores the
        optimizer's old hyperparameters with its state; the new segment's (lr, ...) are the
        ones the recipe built from the new parameters, so they are put back."""
        groups = self.recipe.optimizer.param_groups
        built_groups = (self._built or self._build()).hyperparameters
        if len(groups) != len(built_groups):
            logger.warning(
                "%s has %s optimizer param groups, the recipe builds %s: hyperparameters kept "
                "as restored.",
                checkpoint,
                len(groups),
                len(built_groups),
            )
            return
        for group, built in zip(groups, built_groups, strict=True):
            group.update(copy.deepcopy(built))
        logger.info(
            "%s predates this run's parameters (from step %s): optimizer hyperparameters set "
            "from the current config.",
            checkpoint,
            self.config_from_step,
        )

    def latest_checkpoint(self) -> str:
        """The newest checkpoint that verifies (a corrupt newer one is skipped, loudly).

        With several ranks, rank 0 looks and every rank gets its answer (a collective call).
        """
        return decided_by_rank0(
            lambda: get_latest_valid_checkpoint(
                self.config.save_dir, storage_options=self.config.storage_options
            )
        )

    def sync_with_storage(self, latest: str | None = None) -> int:
        """Make the in-memory state exactly the newest valid checkpoint; return its step.

        With no checkpoint yet, that is the recipe's fresh state (warm-started from
        ``initial_checkpoint`` when given), rebuilt if this session already trained.
        ``latest``: the caller's fresh answer of :meth:`latest_checkpoint`, not asked twice.
        """
        if latest is None:
            latest = self.latest_checkpoint()
        step = step_from_checkpoint(latest) if latest else 0
        self._move_aside_newer_than(step)
        if self.synced_step == step:
            return step
        if latest:
            logger.info("Restoring %s.", latest)
            self._check_fits_on_every_rank(latest)
            try:
                self.snapshot.restore(latest)  # every byte hashed as it is read
            except CorruptCheckpointError as error:
                if is_distributed():
                    # The other ranks may have read their parts fine and be waiting in a
                    # collective: the job fails (its collective timeout ends the wait) and the
                    # retry decides afresh, without the checkpoint moved aside here.
                    self.synced_step = None
                    self.pristine = False
                    _quarantine_quietly(latest, self.config.storage_options)
                    raise
                # Bytes were read and are wrong (a read *fault* would be CheckpointReadError
                # and propagate): move it aside, fall back to the one before it. The state
                # may be half-restored, so nothing in memory counts as synced any more.
                logger.warning("%s; falling back to the previous valid checkpoint.", error)
                self.synced_step = None
                self.pristine = False
                quarantine_checkpoint(latest, storage_options=self.config.storage_options)
                return self.sync_with_storage()
            if step < self.config_from_step:
                self._apply_built_hyperparameters(latest)
        else:
            if not self.pristine:
                self._build()
            if self.config.initial_checkpoint:
                logger.info("Warm start: weights from %s.", self.config.initial_checkpoint)
                self._check_fits_on_every_rank(self.config.initial_checkpoint, keys=["model"])
                self.snapshot.restore(self.config.initial_checkpoint, keys=["model"])
        self.snapshot.step = step
        self.synced_step = step
        return step

    def check_fits(self, checkpoint: str, keys: list[str] | None = None) -> None:
        """Raise ``CheckpointShapeMismatchError`` unless ``checkpoint`` restores into this
        state (all of it, or ``keys``); reads its manifest only, changes nothing."""
        state = {
            key: value
            for key, value in self.snapshot.state.items()
            if key != EXTRA_STATE and (keys is None or key in keys)
        }
        check_checkpoint_fits(checkpoint, state, self.config.storage_options)

    def _check_fits_on_every_rank(self, checkpoint: str, keys: list[str] | None = None) -> None:
        """With several ranks: :meth:`check_fits` on each rank's own part, every rank raising
        the same ``CheckpointShapeMismatchError`` (the lowest failing rank's) if any part does
        not fit.

        Why here: a run with several ranks is checked by its ranks, not by its flow process
        (which never builds the model). The restore checks shapes as well, but on each rank
        alone: a rank whose part fits would go on into the restore's collectives and wait
        there for peers that already failed. In one process the restore's own check is it.
        """
        if is_distributed():
            _raise_on_every_rank(lambda: self.check_fits(checkpoint, keys))

    def _move_aside_newer_than(self, step: int) -> None:
        """Committed checkpoints past the newest valid one are corrupt: training will write
        those steps again, so they are moved aside (never deleted) to make room."""
        if not is_primary():
            return
        options = self.config.storage_options
        for checkpoint in list_checkpoints(self.config.save_dir, options):
            if checkpoint.step > step:
                quarantine_checkpoint(checkpoint.path, storage_options=options)

    def close(self) -> None:
        if self._built is not None:
            self._built.snapshot.close()


def _raise_on_every_rank(check: Callable[[], None]) -> None:
    """Run ``check`` on every rank, then raise on every rank if it failed on any: a shape
    mismatch as itself (the lowest rank's message), any other failure as the failing rank's
    own error there and :class:`PeerRankCheckError` on the others. One collective, which
    every rank reaches whatever its own check did."""
    outcome: tuple[str, str] | None = None  # ("mismatch" | "error", message)
    failure: Exception | None = None
    try:
        check()
    except CheckpointShapeMismatchError as error:
        outcome = ("mismatch", str(error))
    except Exception as error:  # still join the collective below, then raise it
        outcome, failure = ("error", f"{type(error).__name__}: {error}"), error
    outcomes: list[tuple[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, outcome)
    mismatches = [found[1] for found in outcomes if found is not None and found[0] == "mismatch"]
    if mismatches:
        raise CheckpointShapeMismatchError(mismatches[0])
    if failure is not None:
        raise failure
    failed = [(rank, found[1]) for rank, found in enumerate(outcomes) if found is not None]
    if failed:
        rank, message = failed[0]
        raise PeerRankCheckError(f"rank {rank} could not check the checkpoint: {message}")


def _quarantine_quietly(checkpoint: str, storage_options: dict[str, Any] | None) -> None:
    """Move ``checkpoint`` aside unless another rank already did (or is doing) it."""
    try:
        quarantine_checkpoint(checkpoint, storage_options=storage_options)
    except (FileNotFoundError, CheckpointError) as error:
        logger.warning("Could not move %s aside (another rank may have): %s", checkpoint, error)


_sessions: dict[str, TrainingSession] = {}
_sessions_lock = threading.Lock()


def get_session(config: TrainConfig) -> TrainingSession:
    """The session of this run in this process (created on first use)."""
    key = config.model_dump_json()
    with _sessions_lock:
        session = _sessions.get(key)
        if session is None:
            session = _sessions[key] = TrainingSession(config)
        return session


def close_session(config: TrainConfig) -> None:
    """Wait for the run's pending saves and forget its in-memory state."""
    with _sessions_lock:
        session = _sessions.pop(config.model_dump_json(), None)
    if session is not None:
        session.close()
