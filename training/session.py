"""The in-process training state of one run, and its agreement with the checkpoint directory.

Prefect tasks receive config and return small results; the model and optimizer live here, in
the process, looked up by the run's config. The checkpoint directory is the one source of
truth: a session knows at which committed step its in-memory state is exact
(``synced_step``), and anything else -- a fresh process, a task retry after a failure
half-way through an epoch -- restores the newest checkpoint that verifies first.
"""

from __future__ import annotations

import logging
import threading

from torchsnapshot import RNGState

from recipes.base import Recipe, load_recipe
from tml_checkpointing import (
    PreemptionGuard,
    Snapshot,
    get_latest_valid_checkpoint,
    list_checkpoints,
    quarantine_checkpoint,
    step_from_checkpoint,
)

from .config import TrainConfig

logger = logging.getLogger(__name__)


class TrainingSession:
    """Model, optimizer and Snapshot of one run, built from its recipe."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.synced_step: int | None = None
        self.pristine = True  # state is exactly what the recipe built (nothing trained yet)
        self.preemption: PreemptionGuard | None = None  # set by the flow, checked every step
        self._build()

    def _build(self) -> None:
        self.pristine = True
        self.recipe: Recipe = load_recipe(self.config.recipe)(self.config.recipe_params())
        self.snapshot = Snapshot(
            self.config.save_dir,
            {"model": self.recipe.model, "optimizer": self.recipe.optimizer, "rng": RNGState()},
            storage_options=self.config.storage_options,
        )

    def latest_checkpoint(self) -> str:
        """The newest checkpoint that verifies (a corrupt newer one is skipped, loudly)."""
        return get_latest_valid_checkpoint(
            self.config.save_dir, storage_options=self.config.storage_options
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
            self.snapshot.restore(latest)
        else:
            if not self.pristine:
                self._build()
            if self.config.initial_checkpoint:
                logger.info("Warm start: weights from %s.", self.config.initial_checkpoint)
                self.snapshot.restore(self.config.initial_checkpoint, keys=["model"])
        self.snapshot.step = step
        self.synced_step = step
        return step

    def _move_aside_newer_than(self, step: int) -> None:
        """Committed checkpoints past the newest valid one are corrupt: training will write
        those steps again, so they are moved aside (never deleted) to make room."""
        options = self.config.storage_options
        for checkpoint in list_checkpoints(self.config.save_dir, options):
            if checkpoint.step > step:
                quarantine_checkpoint(checkpoint.path, storage_options=options)

    def close(self) -> None:
        self.snapshot.close()


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
