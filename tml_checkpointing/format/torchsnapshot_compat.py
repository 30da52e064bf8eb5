"""The places where we lean on torchsnapshot 0.1.0 internals, kept together and small.

torchsnapshot is pinned (``==0.1.0``; upstream is nearly unmaintained), so these are stable.

* :class:`KeyFilteredSnapshot`: 0.1.0's ``_load_stateful`` reads *every* entry of the snapshot
  for *each* stateful it restores, then keeps the ones under that key: restoring
  ``{model, optimizer, extra_state, rng}`` reads the checkpoint four times. We hand it a
  manifest restricted to the key being loaded, so each byte is read once. The same walk is
  torchsnapshot issue 135: with TorchRec's ``{"model": dmp, "optimizer": opt}`` as separate
  entries, restoring one entry met the other's ``ShardedTensor`` entries, which have no object
  to read into ("Reading a ShardedTensor without a runtime object is not supported").
* Resharding of nested sharded tensors (:func:`reshard_manifest`): 0.1.0 lets a rank load
  shards it did not save ("elasticity": another world size, another sharding plan) only when
  *every* sharded tensor of the snapshot sits at the root of its entry (``model/<name>``).
  Optimizer state (``optimizer/state/<param>/momentum1``) never does, and with separate model
  and optimizer entries the model's tables then lost elasticity too. We apply the same rule
  at any depth: a sharded tensor the restoring state asks for is read from all ranks' shards
  (containers created as needed); one it does not ask for is dropped.
* :func:`parse_metadata_as_json_first`: torchsnapshot writes its metadata as JSON (a subset
  of YAML, "for serialization performance") but reads it back with a YAML loader, whose
  Python-side construction took 1.8 s per read for 5,000 tensors here (json: ~0.05 s). Its
  reader is pointed at a loader that tries JSON first and falls back to YAML.
* :func:`in_process_barrier_store`: ``async_take`` commits in a background thread behind a
  ``dist.Store`` barrier. Without an initialised process group, torchsnapshot bootstraps a
  ``TCPStore`` listening on the machine's hostname. One process needs no network for a barrier
  with itself, so we give it an in-process ``HashStore`` (fresh per save, so a retried save of
  the same path never sees a previous attempt's barrier keys).
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torchsnapshot
import torchsnapshot.manifest
import yaml
from torchsnapshot import dist_store
from torchsnapshot.flatten import flatten
from torchsnapshot.manifest import DictEntry, Entry, ShardedTensorEntry, is_dict_entry
from torchsnapshot.manifest_ops import get_manifest_for_rank

_STORE_LOCK = threading.Lock()


class _JsonFirstYaml:
    """Stands in for the ``yaml`` module inside ``torchsnapshot.manifest`` (only ``load``
    is used there): the same documents, parsed by ``json`` when they are JSON."""

    @staticmethod
    def load(text: str, Loader: Any) -> Any:
        try:
            return json.loads(text)
        except ValueError:  # YAML that is not JSON (metadata of other writers)
            return yaml.load(text, Loader=Loader)


def manifest_of_rank(metadata: Any, rank: int) -> dict[str, Entry]:
    """``get_manifest_for_rank(metadata, rank)[0]``, read-only: one rank's checkpoint is its
    ``0/`` entries as they are (torchsnapshot deep-copies every entry: 0.7 s for 5,000)."""
    if metadata.world_size == 1:
        return {path[2:]: entry for path, entry in metadata.manifest.items() if path[:2] == "0/"}
    manifest: dict[str, Entry] = get_manifest_for_rank(metadata=metadata, rank=rank)[0]
    return manifest


def parse_metadata_as_json_first() -> None:
    """Install :class:`_JsonFirstYaml` (idempotent)."""
    torchsnapshot.manifest.yaml = _JsonFirstYaml  # type: ignore[attr-defined]


parse_metadata_as_json_first()


class KeyFilteredSnapshot(torchsnapshot.Snapshot):
    """A ``torchsnapshot.Snapshot`` whose restore reads each stateful's entries only."""

    def _load_stateful(
        self, stateful_key: str, stateful: Any, storage: Any, pg: Any, event_loop: Any
    ) -> None:
        full = self.metadata
        restricted = restrict_metadata(full, stateful_key)
        if stateful is not None:
            restricted = reshard_manifest(restricted, stateful_key, stateful, pg.get_rank())
        self._metadata = restricted
        try:
            super()._load_stateful(stateful_key, stateful, storage, pg, event_loop)
        finally:
            self._metadata = full


def restrict_metadata(metadata: Any, stateful_key: str) -> Any:
    """Snapshot metadata keeping only the manifest entries of one top-level state key."""

    def belongs(global_path: str) -> bool:
        logical = global_path.split("/", 1)[1] if "/" in global_path else ""
        return logical == stateful_key or logical.startswith(f"{stateful_key}/")

    manifest = {path: entry for path, entry in metadata.manifest.items() if belongs(path)}
    return dataclasses.replace(metadata, manifest=manifest)


def reshard_manifest(metadata: Any, stateful_key: str, stateful: Any, rank: int) -> Any:
    """Metadata whose manifest for ``rank`` holds exactly the sharded tensors ``stateful`` asks for.

    Each requested sharded tensor gets the entry merged from every saving rank's shards (so
    any plan or world size can read its part); sharded entries it does not request are
    removed, with containers left empty by that. The result names only ``rank``, so
    torchsnapshot's own ``get_manifest_for_rank`` returns this manifest unchanged.

    A rank that did not exist when the checkpoint was saved (1 rank saved, 2 restore) reads
    the non-sharded state as rank 0 saved it: in a sharded model that is the data-parallel
    (replicated) part, identical on every rank. 0.1.0 would give it nothing to load.
    """
    manifest, merged = get_manifest_for_rank(
        metadata=metadata, rank=rank if rank < metadata.world_size else 0
    )
    _, flattened = flatten(stateful.state_dict(), prefix=stateful_key)
    requested = {path for path, value in flattened.items() if isinstance(value, torch.Tensor)}
    for path in sorted(requested & merged.keys()):
        if path not in manifest:
            _add_entry(manifest, path, merged[path])
    for path in [p for p, e in manifest.items() if isinstance(e, ShardedTensorEntry)]:
        if path not in requested:
            _remove_entry(manifest, path)
    return dataclasses.replace(
        metadata,
        world_size=max(metadata.world_size, rank + 1),
        manifest={f"{rank}/{path}": entry for path, entry in manifest.items()},
    )


def _add_entry(manifest: dict[str, Entry], path: str, entry: Entry) -> None:
    manifest[path] = entry
    parent, _, key = path.rpartition("/")
    if not parent:
        return
    if parent not in manifest:
        _add_entry(manifest, parent, DictEntry(keys=[]))
    container = manifest[parent]
    if is_dict_entry(container):
        keys = container.keys  # type: ignore[attr-defined]
        if key not in keys and not (key.isdigit() and int(key) in keys):
            keys.append(key)


def _remove_entry(manifest: dict[str, Entry], path: str) -> None:
    """Remove ``path``, and its parent too when that leaves the parent an empty dict."""
    del manifest[path]
    parent, _, key = path.rpartition("/")
    container = manifest.get(parent)
    if container is None or not is_dict_entry(container):
        return
    keys = container.keys  # type: ignore[attr-defined]
    for candidate in (key, int(key) if key.isdigit() else None):
        if candidate in keys:
            keys.remove(candidate)
    if not keys and "/" in parent:  # never the stateful's own root entry
        _remove_entry(manifest, parent)


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
