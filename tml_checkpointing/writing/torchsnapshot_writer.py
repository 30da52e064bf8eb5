"""The fallback writer: torchsnapshot's own ``async_take`` (sharded, GPU or multi-rank state).

It goes through the storage plugin (``tml-fsspec://``), so the sidecar, the events and the
commit protocol are the same as the writer process's.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torchsnapshot
from torch.nn.parallel import DistributedDataParallel
from torchsnapshot import RNGState

from ..format.torchsnapshot_compat import in_process_barrier_store
from ..storage.filesystem import StorageOptions
from ..storage.plugin import transport_url


def start_torchsnapshot_save(
    path: str, state: Mapping[str, Any], storage_options: StorageOptions
) -> torchsnapshot.snapshot.PendingSnapshot:
    """Start writing ``state`` to ``path`` with torchsnapshot's writer thread."""
    app_state = {
        key: value if _must_pass_through(value) else _ConsistentStateful(value)
        for key, value in state.items()
    }
    with in_process_barrier_store():
        return torchsnapshot.Snapshot.async_take(
            path=transport_url(path), app_state=app_state, storage_options=storage_options
        )


def _must_pass_through(value: Any) -> bool:
    """torchsnapshot inspects these types itself (RNG ordering, DDP replication)."""
    return isinstance(value, RNGState | DistributedDataParallel)


class _ConsistentStateful:
    """Makes a save independent of later in-place changes to non-tensor state.

    torchsnapshot copies tensors before ``async_take`` returns, but pickles other leaves
    (lists, numpy arrays, custom objects) later, in the background. Copying those leaves at
    save time keeps the promise that the checkpoint is the state as of ``save``.
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def state_dict(self) -> Any:
        state_dict = self._inner.state_dict()
        keep_tensors = {id(t): t for t in _tensors_in(state_dict)}
        return copy.deepcopy(state_dict, memo=keep_tensors)

    def load_state_dict(self, state_dict: Any) -> None:
        self._inner.load_state_dict(state_dict)


def _tensors_in(value: Any) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors_in(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors_in(item)
