"""Child processes that end as soon as the process that owns them dies, however it dies.

Why: a process that outlives its owner keeps working for nobody. After ``kill -9`` of a
``tml train`` process group, its ranks (``torchrun`` starts each in a session of its own, out
of the group's reach) trained on for seconds and started new checkpoints; on GPUs they would
hold device memory. No process can react to another's SIGKILL, so every child must learn of
its parent's death by itself and end at once -- without committing anything more. Two ways,
chosen by which thread of the parent starts the child:

* :func:`parent_death_preexec` and :func:`die_with_parent`: Linux's ``PR_SET_PDEATHSIG``
  with SIGKILL: the kernel kills the child as its parent exits, whatever either is doing.
  prctl(2): the "parent" is the *thread* that forked the child, so this is only for children
  whose forking thread lives as long as they should -- ``torchrun`` (forked by the launcher's
  thread, which waits for it), the ranks (forked by the ``torchrun`` agent's main thread).
  A parent that died before the prctl took effect sends nothing, so the child checks right
  after arming that its parent is still the expected one, and dies if not. Not Linux: no-op.
* :func:`watch_parent`: a daemon thread polls ``getppid()`` (as PyTorch's DataLoader workers
  watch theirs), for the checkpoint writer process: any thread of the training process may
  start it (a relay thread that ends after one save, a Prefect task's thread), and the thread
  rule above would kill it with that thread. ``getppid()`` names the parent *process*; it
  changes only when the whole process is gone. Every POSIX system.

SIGKILL, never SIGTERM: a rank answers SIGTERM as a preemption, by saving the step in progress
-- a commit after its owner died (measured: with the launcher SIGKILLed alone and
``torchrun``'s death signal SIGTERM, the ranks committed one more step). SIGKILL loses
nothing: a checkpoint counts only once its commit marker, written last, is there.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCH_INTERVAL_S = 0.1
"""How often :func:`watch_parent` asks: about the longest a watched child outlives its parent."""

Prctl = Callable[[int, int, int, int, int], int]


def _prctl() -> Prctl | None:
    """libc's ``prctl``, resolved here (never in a forked child: ``dlopen`` there may
    deadlock on a lock another thread of the parent held); ``None`` where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl: Prctl = ctypes.CDLL(None, use_errno=True).prctl
    return prctl


def _die() -> None:
    """End now, as the death signal would have: no cleanup, no flush, nothing committed."""
    os.kill(os.getpid(), signal.SIGKILL)


def parent_of(pid: int) -> int | None:
    """The parent pid of process ``pid`` (Linux ``/proc``); ``None`` if it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()  # the name may hold spaces
        return int(fields[1])  # after the name: state, then ppid
    except (OSError, IndexError, ValueError):
        return None


def parent_death_preexec() -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets SIGKILL when the calling
    thread exits (call it from the thread that starts the child and outlives it).

    It runs in the child between fork and exec (the setting survives exec, prctl(2)).
    ``None`` (no ``preexec_fn``) where there is no ``prctl``.
    """
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the line above took effect
            _die()

    return arm


def die_with_parent(*, grandparent: int | None = None) -> None:
    """Get SIGKILL when this process's parent (the thread that forked it) exits.

    For a child started by a program we do not control (``torchrun`` starting a rank): call it
    first thing. ``grandparent``: the pid the parent's own parent must be (the launcher of
    ``torchrun``, which the rank's environment names). A parent that died before the prctl left
    this process to a reaper, whose parent is not that pid: then it dies at once. A ``/proc``
    that cannot be read proves nothing either way: it goes on. A no-op where there is no
    ``prctl``.
    """
    prctl = _prctl()
    if prctl is None:
        return
    prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if grandparent is None:
        return
    found = parent_of(os.getppid())
    if found is not None and found != grandparent:
        _die()


def watch_parent(parent: int, interval: float = WATCH_INTERVAL_S) -> None:
    """End this process (SIGKILL) once ``parent`` is no longer its parent process.

    Checks once now (the parent may be gone already), then every ``interval`` seconds on a
    daemon thread. ``getppid()`` is the kernel's answer, not an event anyone could send: a
    poll is the portable way to wait for it.
    """
    if os.getppid() != parent:
        _die()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        _die()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
