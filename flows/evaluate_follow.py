"""Waking an evaluator when its run commits a checkpoint: Prefect's own event stream.

Why: an event-started evaluate run that has evaluated everything pending keeps its model
loaded and follows the run (see flows/evaluate.py). Polling storage every few seconds would
add up to that much latency per checkpoint (and requests on S3); the server already streams
every ``tml.checkpoint.committed`` event, so the evaluator subscribes to the ones of its
``save_dir`` (``prefect.events.clients.get_events_subscriber``, a websocket, ~0.15 s from emit
to delivery on loopback) and lists storage when one arrives. Storage stays the truth: an event
is only a reason to look, and a look is also taken every ``fallback_seconds`` in case the
stream drops (the subscriber reconnects by itself) or an event is lost.

:class:`CommitWatcher` is started *before* the evaluator's first listing: a commit between that
listing and the subscription would otherwise be seen by neither.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from types import TracebackType

from prefect.events.clients import get_events_subscriber
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.events.schemas.events import ResourceSpecification

from tasks.checkpoint_events import COMMITTED

logger = logging.getLogger(__name__)

_SUBSCRIBE_TIMEOUT_S = 10.0


class CommitWatcher:
    """Wakes :meth:`wait` when ``tml.checkpoint.committed`` arrives for ``save_dir``."""

    def __init__(self, save_dir: str) -> None:
        self.save_dir = save_dir.rstrip("/")
        self.subscribed = False
        self._wake = threading.Event()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        # The flow's Prefect settings (its API URL) live in context variables.
        self._context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=self._context.run, args=(self._run,), name="tml-commit-watcher", daemon=True
        )

    def __enter__(self) -> CommitWatcher:
        self._thread.start()
        if not self._ready.wait(_SUBSCRIBE_TIMEOUT_S) or not self.subscribed:
            logger.warning(
                "No subscription to %s events of %s; following by listing storage only.",
                COMMITTED,
                self.save_dir,
            )
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        loop, task = self._loop, self._task
        if loop is not None and task is not None:
            loop.call_soon_threadsafe(task.cancel)
        self._thread.join(timeout=5)

    def wait(self, seconds: float) -> bool:
        """Wait until a commit of the run arrives (``True``) or ``seconds`` pass (``False``)."""
        woke = self._wake.wait(max(seconds, 0.0))
        self._wake.clear()
        return woke

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._task = loop.create_task(self._listen())
            loop.run_until_complete(self._task)
        except (asyncio.CancelledError, Exception) as error:
            if not isinstance(error, asyncio.CancelledError):
                logger.warning("Commit events of %s no longer followed: %s", self.save_dir, error)
        finally:
            self._ready.set()
            loop.close()

    async def _listen(self) -> None:
        event_filter = EventFilter(
            event=EventNameFilter(name=[COMMITTED]),
            resource=EventResourceFilter(
                labels=ResourceSpecification({"tml.save_dir": self.save_dir})
            ),
        )
        async with get_events_subscriber(filter=event_filter) as subscriber:
            self.subscribed = True
            self._ready.set()
            async for _ in subscriber:
                self._wake.set()
