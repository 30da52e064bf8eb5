"""``PendingSave``: the handle on a checkpoint being written in the background.

The same handle for every writer (the writer process, a writer thread, torchsnapshot's own
thread): each is shaped like torchsnapshot's pending snapshot (``thread``, ``exc_info``).
"""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import Protocol

from .. import events
from ..errors import SaveDirLockedError
from ..format.chain_link import ChainLink
from .save_protocol import save_failed


class Writing(Protocol):
    """A save being written: torchsnapshot's pending snapshot, and every writer of ours."""

    @property
    def thread(self) -> threading.Thread: ...

    @property
    def exc_info(
        self,
    ) -> tuple[type[BaseException], BaseException, TracebackType | None] | None: ...


class PendingSave:
    """Handle on a checkpoint being written in the background."""

    def __init__(
        self,
        path: str,
        global_step: int,
        pending: Writing,
        link: ChainLink | None = None,
    ) -> None:
        self.path = path
        self.global_step = global_step
        self._link = link  # an incremental save's place in its chain
        self._pending = pending
        self._started = time.monotonic()
        self.error_reported = False  # the failure was already raised to a caller
        self.committed = False  # a wait() saw it committed

    @property
    def link(self) -> ChainLink | None:
        """An incremental save's place in its chain (a save staged in the background knows
        it once its copy is done)."""
        if self._link is None:
            found = getattr(self._pending, "link", None)
            if isinstance(found, ChainLink):
                self._link = found
        return self._link

    def staged(self, timeout: float | None = None) -> bool:
        """Wait until the state's copy is done (at once unless staged in the background);
        ``False`` if ``timeout`` passed first. After it, training may change the state freely."""
        event = getattr(self._pending, "staged", None)
        return True if event is None else bool(event.wait(timeout))

    @property
    def held_training_s(self) -> float:
        """Seconds the training loop waited for this save: with ``background_staging``, the
        time its next update was held until the copy ended (0.0 for a save that copied in
        ``save()``, whose cost is the time ``save()`` took)."""
        held = getattr(self._pending, "held_training_s", 0.0)
        return float(held)

    def done(self) -> bool:
        """Whether writing has finished (successfully or not): ``wait`` will not block."""
        return not self._pending.thread.is_alive()

    def wait(self, timeout: float | None = None) -> str:
        """Block until the checkpoint is committed; return its path.

        Raises :class:`CheckpointWriteError` when writing failed (nothing was committed) and
        ``TimeoutError`` when ``timeout`` seconds pass first.
        """
        self._pending.thread.join(timeout)
        if self._pending.thread.is_alive():
            raise TimeoutError(f"checkpoint {self.path} still being written after {timeout}s")
        if self._pending.exc_info is not None:
            cause = self._pending.exc_info[1]
            if not self.error_reported:  # one event per failed save, however often waited on
                events.emit(
                    events.SAVE_FAILED, path=self.path, step=self.global_step, error=repr(cause)
                )
            self.error_reported = True
            if isinstance(cause, SaveDirLockedError):
                raise cause  # the run lost its writer lock: it must stop, not retry the save
            raise save_failed(
                self.global_step, self.path, f"{type(cause).__name__}: {cause}"
            ) from cause
        self.committed = True
        return self.path

    def __repr__(self) -> str:
        state = "done" if self.done() else "writing"
        return f"PendingSave(path={self.path!r}, {state})"
