"""Preemption: turn SIGTERM / SIGINT / SIGUSR1 into "finish the step, checkpoint, exit non-zero".

Why: schedulers (Kubernetes, SLURM with ``--signal=USR1``, spot instances) announce a kill with
a signal and a grace period; Ctrl-C in a terminal sends SIGINT to the whole process group.
Dying at once loses everything since the last checkpoint (and a KeyboardInterrupt raised in
the middle of a save is worse); dying with exit code 0 makes the orchestrator think the run
finished. So the handler only sets a flag (doing I/O inside a signal handler is unsafe); the
training loop checks it once per step and calls :func:`save_final_checkpoint`, which drains
the save in flight, writes a checkpoint at the current step and raises
:class:`PreemptedError`, whose ``exit_code`` (``128 + signum``: 143 for SIGTERM, 130 for
SIGINT) the process exits with::

    with PreemptionGuard() as guard:          # first, before restoring: a signal that
        start = resume(snapshot)              # arrives earlier kills the default way
        for step in range(start, total):
            train_step(step)
            if guard.requested:
                save_final_checkpoint(snapshot, step, guard)   # raises PreemptedError
    ...
    except PreemptedError as error:
        sys.exit(error.exit_code)
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterable
from types import FrameType, TracebackType
from typing import Any, NoReturn, Protocol

from ..catalog.discovery import is_committed
from ..errors import CheckpointError, InvalidArgumentError, PreemptedError
from ..storage.filesystem import join_url


class _Pending(Protocol):
    def wait(self, timeout: float | None = None, /) -> str | None: ...


class Saver(Protocol):
    """What :func:`save_final_checkpoint` needs of a :class:`~tml_checkpointing.Snapshot`.

    A protocol rather than the class itself: lifecycle sits below the facade, which is built
    on it, so naming the facade here would climb a layer.
    """

    @property
    def save_dir(self) -> str: ...

    @property
    def storage_options(self) -> Any: ...

    def wait(self) -> str | None: ...

    def save(self, step: int) -> _Pending: ...


logger = logging.getLogger(__name__)

DEFAULT_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class PreemptionGuard:
    """Context manager that records preemption signals instead of dying on them.

    Inside the ``with`` block, each of ``signals`` sets :attr:`requested` (and
    :attr:`signal_name`, :attr:`signum`); on exit the previous handlers come back. Must be
    entered in the main thread (Python delivers signals only there).
    """

    def __init__(self, signals: Iterable[int] = DEFAULT_SIGNALS) -> None:
        self.signals = tuple(signal.Signals(s) for s in signals)
        if not self.signals:
            raise InvalidArgumentError("PreemptionGuard needs at least one signal")
        self.requested = False
        self.signal_name: str | None = None
        self.signum: int | None = None
        self._previous: dict[signal.Signals, Any] = {}

    @property
    def exit_code(self) -> int:
        """``128 + signum`` of the signal received (143 SIGTERM, 130 SIGINT); 1 if none was."""
        return 128 + self.signum if self.signum is not None else 1

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.requested:
            self.signum = signum
            self.signal_name = signal.Signals(signum).name
        self.requested = True

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is not threading.main_thread():
            raise InvalidArgumentError(
                "PreemptionGuard must be entered in the main thread: Python runs signal "
                "handlers only there"
            )
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()


def save_final_checkpoint(
    snapshot: Saver, step: int, guard: PreemptionGuard, *, timeout_s: float | None = None
) -> NoReturn:
    """Drain the pending save, checkpoint ``step``, then raise :class:`PreemptedError`.

    Skips the save when ``step`` is already committed. If the final save fails or does not
    finish within ``timeout_s``, the error still says so, with ``step`` of the last checkpoint
    known committed (or ``None``): the next run resumes from whatever is committed.
    """
    signal_name = guard.signal_name or "preemption request"
    final_step: int | None = None
    problem = ""
    try:
        drained = snapshot.wait()
        if drained is not None:
            final_step = int(drained.rstrip("/").rsplit("/", 1)[-1])
        if is_committed(join_url(snapshot.save_dir, str(step)), snapshot.storage_options):
            final_step = step
        else:
            snapshot.save(step).wait(timeout_s)
            final_step = step
    except (CheckpointError, TimeoutError) as error:
        problem = f"; the final save failed ({error})"
        logger.error("Final checkpoint at step %s failed: %s", step, error)
    where = f"step {final_step}" if final_step is not None else "no checkpoint"
    logger.warning("Preempted by %s: final checkpoint at %s.", signal_name, where)
    raise PreemptedError(
        f"training stopped by {signal_name} at step {step}; last checkpoint: {where}{problem}. "
        "Resume from get_latest_valid_checkpoint(save_dir).",
        step=final_step,
        signal_name=signal_name,
        exit_code=guard.exit_code,
    )
