"""Checkpoint events: what the library says about a run's checkpoints, as Prefect events.

Why: an evaluator that polls a directory every few seconds wastes a process per run and
notices a checkpoint late; a Prefect event lets an automation (the ``evaluate`` deployment's
trigger in ``prefect.yaml``) start the evaluation the moment a checkpoint is committed, and the
Events page shows every commit, deletion and corruption finding of every run in one feed.

The library knows nothing of Prefect (:mod:`tml_checkpointing.events` calls plain
subscribers); :class:`CheckpointAnnouncer` subscribes for one ``save_dir`` while a flow runs
and emits:

- ``tml.checkpoint.committed``: resource = the checkpoint URL; payload ``step``, ``save_dir``,
  ``experiment``, ``epoch``, ``mid_epoch``, training ``metrics``, ``flow_run_id``;
- ``tml.checkpoint.deleted``: retention removed it;
- ``tml.checkpoint.corrupt``: a resume found it corrupt and skipped it (``error``);
- ``tml.checkpoint.quarantined``: it was moved aside (``target``, ``reason``).

Library events come from the saving thread (a writer thread, or the relay of the writer
process), which has none of the flow's Prefect context (its API URL among them: tests and
``tml`` set it in a context). Each emit therefore runs in a copy of the flow's context taken
when the announcer starts. Commits are also caught up after each epoch
(:meth:`CheckpointAnnouncer.catch_up`), for checkpoints committed by other processes (ranks
under ``torchrun``); each commit and corruption finding is announced once per announcer.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

from prefect.events import emit_event
from prefect.runtime import flow_run

from tml_checkpointing import events, list_checkpoints, step_from_checkpoint
from tml_checkpointing.storage.filesystem import parent_url

logger = logging.getLogger(__name__)

COMMITTED = "tml.checkpoint.committed"
DELETED = "tml.checkpoint.deleted"
CORRUPT = "tml.checkpoint.corrupt"
QUARANTINED = "tml.checkpoint.quarantined"

# Library event -> Prefect event, for the ones announced as they happen.
_PREFECT_EVENT = {
    events.SAVE_COMMITTED: COMMITTED,
    events.DELETE_DONE: DELETED,
    events.CORRUPT_FOUND: CORRUPT,
    events.QUARANTINED: QUARANTINED,
}


class CheckpointAnnouncer:
    """Emit the Prefect events of ``save_dir``'s checkpoints while the ``with`` block runs.

    ``describe(step)`` gives what a committed checkpoint's payload adds (epoch, training
    metrics...); ``experiment`` is the run's (:func:`training.run_info.experiment_of`): the
    evaluate trigger passes it on; ``after_step``: checkpoints at or before it are older than
    this run and are not announced by :meth:`catch_up`.
    """

    def __init__(
        self,
        save_dir: str,
        describe: Callable[[int], Mapping[str, Any]],
        *,
        experiment: str,
        after_step: int = 0,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.save_dir = save_dir.rstrip("/")
        self.experiment = experiment
        self._describe = describe
        self._after_step = after_step
        self._storage_options = storage_options
        # (event, step) said once: commits, and corruption found by each of a resume's checks.
        self._announced: set[tuple[str, int]] = set()
        self._lock = threading.Lock()
        self._context = contextvars.copy_context()
        self._run = {"id": str(flow_run.get_id() or ""), "name": flow_run.get_name() or ""}

    def __enter__(self) -> CheckpointAnnouncer:
        events.subscribe(self._on_library_event)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        events.unsubscribe(self._on_library_event)

    def catch_up(self) -> None:
        """Announce every committed checkpoint of this run not announced yet (ranks commit in
        their own processes; a failed emit is tried again here)."""
        for checkpoint in list_checkpoints(self.save_dir, self._storage_options):
            if checkpoint.step > self._after_step:
                self._announce(COMMITTED, checkpoint.path, {})

    def _on_library_event(self, event: events.Event) -> None:
        name = _PREFECT_EVENT.get(event.name)
        if name is None or parent_url(event.path).rstrip("/") != self.save_dir:
            return
        extra = {key: str(value) for key, value in event.fields.items() if key != "path"}
        self._announce(name, event.path, extra)

    def _announce(self, name: str, checkpoint: str, extra: Mapping[str, str]) -> None:
        step = step_from_checkpoint(checkpoint)
        with self._lock:  # one thread at a time may run in the copied context
            if name in (COMMITTED, CORRUPT):  # a resume may verify the same checkpoint often
                if (name, step) in self._announced:
                    return
                self._announced.add((name, step))
            payload: dict[str, Any] = {
                "step": step,
                "save_dir": self.save_dir,
                "experiment": self.experiment,
                "flow_run_id": self._run["id"],
                **extra,
            }
            if name == COMMITTED:
                payload.update(self._describe(step))
            self._context.run(self._emit, name, checkpoint, step, payload)

    def _emit(self, name: str, checkpoint: str, step: int, payload: dict[str, Any]) -> None:
        related = []
        if self._run["id"]:
            related.append(
                {
                    "prefect.resource.id": f"prefect.flow-run.{self._run['id']}",
                    "prefect.resource.role": "flow-run",
                    "prefect.resource.name": self._run["name"],
                }
            )
        emit_event(
            event=name,
            resource={
                "prefect.resource.id": checkpoint,
                "prefect.resource.name": f"{self.experiment} step {step}",
                "tml.save_dir": self.save_dir,
                "tml.experiment": self.experiment,
                "tml.step": str(step),
            },
            related=related,
            payload=payload,
        )
