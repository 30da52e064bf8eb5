"""Events: the library says when it passes the moments that matter for crash safety.

Why: a crash test has to kill a process at a *known* point of the commit protocol ("data
written, marker pending", "committed, prune pending", "marker deleted, data not yet") and then
prove what the directory looks like. Sleeping a random time and hoping to land somewhere
fails on a loaded machine; being told "I am here now" does not. Tools (progress bars,
metrics) can listen too.

``subscribe(callback)`` registers ``callback(event)``; every :func:`emit` calls each subscriber
synchronously, in the emitting thread (which is often the background writer thread of a
save), in subscription order. So a subscriber that blocks holds the saver exactly at that
moment (crash tests pause this way, then SIGKILL), and a slow one slows the saver: keep
callbacks short. A subscriber that raises is logged and skipped: a listener can never fail a
save or a prune. With nobody subscribed, :func:`emit` returns after one truthiness check.

Every event carries ``path``, the checkpoint URL in the caller's spelling (``s3://b/run/7``);
see each name's comment for the other fields and for what is on storage at that moment.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

# -- saving (Snapshot.save and its storage plugin), in this order for one save -------------
SAVE_STARTED = "save.started"
"""``Snapshot.save(step)`` accepted the step and the previous save is finished; nothing of
this save is staged or stored yet, not even its claim (leftovers of an earlier attempt at
the same step may be there). Fields: ``path``, ``step``. Emitted in the caller's thread."""
SAVE_DATA_WRITTEN = "save.data_written"
"""Every data file of the checkpoint is stored (and fsynced locally); the integrity sidecar
and the commit marker are not written yet (nor checked: the check that the data files are
all still there comes right after). Fields: ``path``. Writer thread."""
SAVE_RANK_REPORTED = "save.rank_reported"
"""A job of several ranks: this rank's data files are stored and its part of the manifest and
integrity records reached rank 0 (rank 0: its own part is written). Nothing is committed.
Fields: ``path``, ``rank``. A background thread of the rank's process."""
SAVE_RANKS_JOINED = "save.ranks_joined"
"""Rank 0 of a job of several ranks holds every rank's part; the commit (sidecar, marker)
comes next. Fields: ``path``, ``ranks``. A background thread of rank 0's process."""
SAVE_SIDECAR_WRITTEN = "save.sidecar_written"
"""The integrity sidecar is stored too; the commit marker is pending: the checkpoint is still
uncommitted. Fields: ``path``. Writer thread."""
SAVE_COMMITTED = "save.committed"
"""The commit marker is in place (on local disk with its directory entries fsynced) and
the save's claim removed: the checkpoint exists for every reader and the save is over; a
prune after it has not started. Fields: ``path``. Writer thread."""
SAVE_FAILED = "save.failed"
"""The save failed and nothing was committed. Fields: ``path``, ``step``, ``error`` (the
exception's ``repr``). Emitted once, where the failure reaches the caller (``save`` or
the first ``wait`` on it)."""

# -- deleting a committed checkpoint (prune, and quarantine on object stores) --------------
DELETE_STARTED = "delete.started"
"""About to delete a committed checkpoint, commit marker first; nothing removed yet.
Fields: ``path``."""
DELETE_UNCOMMITTED = "delete.uncommitted"
"""The commit marker is gone (durably), the data files are not yet: readers ignore the
directory, ``find_incomplete`` lists it. Fields: ``path``."""
DELETE_DONE = "delete.done"
"""The checkpoint directory is gone. Fields: ``path``."""

# -- moving aside and cleaning up ------------------------------------------------------------
QUARANTINED = "quarantine.moved"
"""A committed checkpoint was moved aside (``quarantine_checkpoint``), or a step directory
whose commit marker is empty (``reason`` ``torn-marker``: by ``clean_incomplete``, or by a new
save of that step). Fields: ``path`` (the old location), ``target`` (where it is now),
``reason``."""
INCOMPLETE_REMOVED = "cleanup.removed"
"""``clean_incomplete`` removed an uncommitted step directory. Fields: ``path``."""

CORRUPT_FOUND = "integrity.corrupt"
"""A committed checkpoint failed verification where a resume looked for the newest valid one
(``get_latest_valid_checkpoint``): it is skipped, nothing is moved or deleted. Fields:
``path``, ``error`` (the reason, as the warning says it)."""

EVENT_NAMES = (
    SAVE_STARTED,
    SAVE_DATA_WRITTEN,
    SAVE_RANK_REPORTED,
    SAVE_RANKS_JOINED,
    SAVE_SIDECAR_WRITTEN,
    SAVE_COMMITTED,
    SAVE_FAILED,
    DELETE_STARTED,
    DELETE_UNCOMMITTED,
    DELETE_DONE,
    QUARANTINED,
    INCOMPLETE_REMOVED,
    CORRUPT_FOUND,
)


@dataclass(frozen=True)
class Event:
    """One moment: its ``name`` (one of the constants above) and its ``fields``."""

    name: str
    fields: Mapping[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> str:
        """The checkpoint the event is about (every event has one)."""
        return str(self.fields.get("path", ""))


Subscriber = Callable[[Event], object]

# Copy-on-write: emit() reads the tuple without a lock; (un)subscribe replace it under one.
_subscribers: tuple[Subscriber, ...] = ()
_lock = threading.Lock()


def subscribe(callback: Subscriber) -> None:
    """Call ``callback(event)`` on every event from now on (in the emitting thread)."""
    global _subscribers
    with _lock:
        _subscribers = (*_subscribers, callback)


def unsubscribe(callback: Subscriber) -> None:
    """Stop calling ``callback``; a callback that is not subscribed is ignored."""
    global _subscribers
    with _lock:
        remaining = list(_subscribers)
        if callback in remaining:
            remaining.remove(callback)
        _subscribers = tuple(remaining)


def emit(name: str, **fields: Any) -> None:
    """Tell every subscriber that ``name`` happened; never raises a subscriber's error."""
    subscribers = _subscribers
    if not subscribers:
        return
    event = Event(name, fields)
    for callback in subscribers:
        try:
            callback(event)
        except Exception:
            logger.exception("Event subscriber %r failed on %s; ignored.", callback, name)
