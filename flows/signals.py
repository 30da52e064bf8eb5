"""How ``tml`` ends on SIGTERM / SIGINT: soon, with exit code 128 + signum, without a traceback.

Schedulers, terminals and Prefect workers stop a run by signalling it (often its whole process
group) and wait a grace period before SIGKILL. Whatever the run is doing, it must end inside
that period with an exit code that says "stopped by a signal" (143 for SIGTERM, 130 for
SIGINT), leave no process behind and print no wall of tracebacks. Three phases:

* **Before training** (imports, the Prefect server's start, the flow's start) and after it
  (reporting, waiting for evaluators): the handler installed by :func:`exit_on_signals` raises
  :class:`SignalExit`, a ``SystemExit``: ``finally`` blocks and ``atexit`` run (Prefect marks
  the flow run Crashed, the private server stops) and Python prints no traceback for it.
  Inside a flow run Prefect's engine swaps in its own SIGTERM handler; on SIGTERM it reports
  the crash, then restores ours and re-sends the signal, which lands here.
* **While epochs run** ``PreemptionGuard`` owns both signals: the step in progress is
  checkpointed and the flow raises ``SystemExit(128 + signum)``; the CLI calls
  :func:`exiting` when that leaves the flow.
* **Either way**, once the process is exiting because of a signal, a watchdog ends it at
  :data:`EXIT_DEADLINE_S` even if teardown hangs (an API that stopped answering, a stuck
  thread), and a second signal ends it at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

TERMINATING_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)
EXIT_DEADLINE_S = 10.0  # from the signal to the end of the process, training excepted


class SignalExit(SystemExit):
    """Raised by the handler: ends the process with ``128 + signum``, without a traceback."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


class _State:
    installed = False  # exit_on_signals() is in force: this process is the CLI's to end
    exit_code: int | None = None  # set once the process is exiting because of a signal


def is_signal_exit_code(code: int) -> bool:
    return code in {128 + int(s) for s in TERMINATING_SIGNALS}


def exit_on_signals() -> Callable[[], None]:
    """Install the CLI's SIGTERM/SIGINT handler (first thing in ``main``); returns a function
    that puts the previous handlers back. Does nothing outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.signal(sig, _handle) for sig in TERMINATING_SIGNALS}
    _State.installed = True

    def restore() -> None:
        _State.installed = False
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    return restore


def exiting(exit_code: int, deadline_s: float | None = None) -> None:
    """The process is ending because of a signal: bound the rest of its life.

    Starts the watchdog (once) and makes any further signal end the process at once. Does
    nothing unless :func:`exit_on_signals` is in force (a flow called in-process, by a test or
    a notebook, must not end its caller).
    """
    if _State.exit_code is not None or not _State.installed:
        return
    _State.exit_code = exit_code
    deadline = EXIT_DEADLINE_S if deadline_s is None else deadline_s
    threading.Thread(
        target=_watchdog, args=(exit_code, deadline), name="tml-exit-watchdog", daemon=True
    ).start()


def stopping_exit_code() -> int | None:
    """``128 + signum`` once a stop signal was received (``None`` before): whatever exception
    the process then ends with, this is its exit code. The handler's ``SignalExit`` can reach
    the top wrapped into another error (raised inside a C extension, e.g. pydantic's
    serialiser during an import), and must still end the run as the signal asked."""
    return _State.exit_code


def _handle(signum: int, frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    if _State.exit_code is not None:  # already on the way out: stop waiting for teardown
        _hard_exit(_State.exit_code, f"tml: second signal ({name}): exiting now")
    exiting(128 + signum)
    os.write(2, f"tml: {name} received: stopping (exit code {128 + signum})\n".encode())
    raise SignalExit(signum)


def _watchdog(exit_code: int, deadline_s: float) -> None:
    time.sleep(deadline_s)
    _hard_exit(exit_code, f"tml: still shutting down after {deadline_s:g}s: exiting now")


def _hard_exit(exit_code: int, message: str) -> None:
    """Exit without teardown (the private Prefect server dies with us; see local_server)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os.write(2, f"{message}\n".encode())
    os._exit(exit_code)
