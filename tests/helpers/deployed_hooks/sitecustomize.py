"""Reports a deployed flow run's library events to a test, and pauses or dies on one.

Python imports ``sitecustomize`` at start-up from ``sys.path``; a test puts this folder on
``PYTHONPATH`` through the *run's* job variables, so only the flow-run process a worker starts
for that run loads it (the worker and the automation's restarts do not). Environment:

* ``TML_TEST_EVENTS_FILE``: append ``pid <pid>`` once, then one line per library event
  (:class:`tests.helpers.event_protocol.Reporter`), to this file;
* ``TML_TEST_PAUSE=EVENT[:N]``: block the thread emitting the N-th such event (a test then
  kills the process at exactly that moment);
* ``TML_TEST_DIE_AT=EVENT[:N]``: SIGKILL this process at the N-th such event (a run that
  dies at every start, as one that runs out of memory does);
* ``TML_TEST_SLOW=EVENT:SECONDS``: spend that long in each such event (a long training run,
  for a test that acts on it while it runs; never a synchronisation).

Only the flow-run engine (``python -m prefect.engine``) reads them, and removes them, so
that processes it starts (the checkpoint writer) report nothing themselves.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def _install() -> None:
    if "prefect.engine" not in sys.orig_argv:  # a supervisor in between passes them on
        return
    events_file = os.environ.pop("TML_TEST_EVENTS_FILE", None)
    pause = os.environ.pop("TML_TEST_PAUSE", None)
    die_at = os.environ.pop("TML_TEST_DIE_AT", None)
    slow = os.environ.pop("TML_TEST_SLOW", None)
    if events_file is None and die_at is None and slow is None:
        return
    from tests.helpers.event_protocol import Reporter, parse_pause, write_line
    from tml_checkpointing import Event, subscribe

    if events_file is not None:
        fd = os.open(events_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        write_line(fd, f"pid {os.getpid()}")
        name, occurrence = parse_pause(pause) if pause else (None, 1)
        subscribe(Reporter(fd, name, occurrence))
    if die_at is not None:
        fatal, remaining = parse_pause(die_at)
        seen = [0]

        def die(event: Event) -> None:
            if event.name == fatal:
                seen[0] += 1
                if seen[0] == remaining:
                    os.kill(os.getpid(), signal.SIGKILL)

        subscribe(die)
    if slow is not None:
        slow_event, _, seconds = slow.partition(":")

        def linger(event: Event) -> None:
            if event.name == slow_event:
                time.sleep(float(seconds))

        subscribe(linger)


_install()
