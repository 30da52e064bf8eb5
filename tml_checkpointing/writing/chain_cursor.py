"""Where a Snapshot's next incremental save attaches to its chain.

Why a cursor: a delta is written against the values the staging block still holds, which are
those of the previous save of this Snapshot, so only that save can be its parent, and only
once it committed (a failed or unfinished save leaves rows in the block that no checkpoint
holds). Anything that makes the block stale (a new state, a new layout, a failure) resets it,
and the next save is full.
"""

from __future__ import annotations

import logging
from typing import Protocol

from ..catalog.discovery import is_committed
from ..errors import InvalidArgumentError
from ..format.chain_link import ChainLink
from ..storage.filesystem import StorageOptions
from .staging import ChainRequest

logger = logging.getLogger(__name__)


class Save(Protocol):
    """What the cursor needs of a save (a :class:`~.pending.PendingSave`)."""

    path: str
    global_step: int
    committed: bool

    @property
    def link(self) -> ChainLink | None: ...


class ChainCursor:
    """The tip of a Snapshot's chain: the newest committed save whose values the staging block
    still holds (``None``: the next incremental save is a full one)."""

    def __init__(self, full_every: int, max_chain_fraction: float) -> None:
        if isinstance(full_every, bool) or not isinstance(full_every, int) or full_every < 1:
            raise InvalidArgumentError(
                f"full_every must be a positive integer (saves per chain), got {full_every!r}"
            )
        if not 0 <= max_chain_fraction <= 10:
            raise InvalidArgumentError(
                "max_chain_fraction (how much a chain's deltas may add up to, as a fraction of "
                f"a full checkpoint) must be between 0 and 10, got {max_chain_fraction!r}"
            )
        self.full_every = full_every
        self.max_chain_fraction = float(max_chain_fraction)
        self._tip: tuple[str, ChainLink] | None = None
        self._last: Save | None = None

    def saved(self, pending: Save) -> None:
        """``pending`` was started: once it settles, it may become the tip."""
        self._last = pending

    def settle(self, global_step: int) -> None:
        """After the previous save settled: it is the next delta's parent if it committed
        (and holds a link, and is older), else the next incremental save is a full one."""
        last, self._last = self._last, None
        if last is None:
            return
        self._tip = None
        if last.committed and last.link is not None and last.global_step < global_step:
            self._tip = (last.path, last.link)

    def reset(self) -> None:
        """The staging block no longer holds the tip's values: the next save is full."""
        self._tip = None

    def request(self, storage_options: StorageOptions) -> ChainRequest:
        """The next incremental save's parent: the tip, if it is still committed."""
        full = ChainRequest(None, None, self.full_every, self.max_chain_fraction)
        if self._tip is None:
            return full
        parent_path, link = self._tip
        if not is_committed(parent_path, storage_options):
            logger.warning("%s is gone: the next checkpoint is a full one.", parent_path)
            self._tip = None
            return full
        name = parent_path.rstrip("/").rsplit("/", 1)[-1]
        return ChainRequest(name, link, self.full_every, self.max_chain_fraction)
