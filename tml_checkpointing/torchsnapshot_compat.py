"""The two places where we lean on torchsnapshot 0.1.0 internals, kept together and small.

torchsnapshot is pinned (``==0.1.0``; upstream is nearly unmaintained), so these are stable.

* :class:`KeyFilteredSnapshot`: 0.1.0's ``_load_stateful`` reads *every* entry of the snapshot
  for *each* stateful it restores, then keeps the ones under that key: restoring
  ``{model, optimizer, extra_state, rng}`` reads the checkpoint four times. We hand it a
  manifest restricted to the key being loaded, so each byte is read once.
* :func:`in_process_barrier_store`: ``async_take`` commits in a background thread behind a
  ``dist.Store`` barrier. Without an initialised process group, torchsnapshot bootstraps a
  ``TCPStore`` listening on the machine's hostname. One process needs no network for a barrier
  with itself, so we give it an in-process ``HashStore`` (fresh per save, so a retried save of
  the same path never sees a previous attempt's barrier keys).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch.distributed as dist
import torchsnapshot
from torchsnapshot import dist_store

_STORE_LOCK = threading.Lock()


class KeyFilteredSnapshot(torchsnapshot.Snapshot):
    """A ``torchsnapshot.Snapshot`` whose restore reads each stateful's entries only."""

    def _load_stateful(self, stateful_key: str, stateful: Any, *args: Any, **kwargs: Any) -> None:
        full = self.metadata
        self._metadata = restrict_metadata(full, stateful_key)
        try:
            super()._load_stateful(stateful_key, stateful, *args, **kwargs)
        finally:
            self._metadata = full


def restrict_metadata(metadata: Any, stateful_key: str) -> Any:
    """Snapshot metadata keeping only the manifest entries of one top-level state key."""

    def belongs(global_path: str) -> bool:
        logical = global_path.split("/", 1)[1] if "/" in global_path else ""
        return logical == stateful_key or logical.startswith(f"{stateful_key}/")

    manifest = {path: entry for path, entry in metadata.manifest.items() if belongs(path)}
    return dataclasses.replace(metadata, manifest=manifest)


@contextmanager
def in_process_barrier_store() -> Iterator[None]:
    """Around ``Snapshot.async_take`` in a single, non-distributed process."""
    if dist.is_available() and dist.is_initialized():
        yield
        return
    with _STORE_LOCK:
        dist_store._pg_to_store[None] = dist.HashStore()  # type: ignore[attr-defined]
        try:
            yield
        finally:
            dist_store._pg_to_store.pop(None, None)
