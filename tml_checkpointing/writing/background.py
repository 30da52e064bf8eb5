"""Staging in the background: ``save()`` returns at once, training's next update waits for it.

Why: copying the state into the staging block is the only part of a save the training process
pays for, and peers (DCP ``async_save``, torch-checkpointing) return from ``save()`` in
milliseconds and copy while the next step's forward pass runs. Doing the same must never
save a torn state, so the state is protected until its copy is done: an :class:`UpdateGate`
hooks the places where training changes the saved tensors in place, and they wait there for
the copy, only if they reach it first:

* every ``torch.optim.Optimizer`` of the state (TorchRec's ``KeyedOptimizer`` and
  ``CombinedOptimizer`` too): a step pre-hook;
* every ``nn.Module`` of the state: the backward pass, through a gradient hook on each output
  tensor of its forward (TorchRec's fused optimizers update embedding rows *inside* backward,
  so the wait must come before it starts), and the forward pass of a submodule that holds
  buffers (batch-norm statistics change in forward).

Changes made another way (``with torch.no_grad(): p -= ...`` by hand, tensors of a plain
``StateDict`` changed in place) are not seen: use ``background_staging=False`` for such loops.
Non-tensor leaves are copied in the training thread before ``save()`` returns.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..format.chain_link import ChainLink

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


class UpdateGate:
    """Holds training's in-place updates of the saved state while a copy of it is made."""

    def __init__(self) -> None:
        self._idle = threading.Event()
        self._idle.set()
        self._handles: list[RemovableHandle] = []
        self._guarded: set[int] = set()  # ids of the objects hooked

    @property
    def copying(self) -> bool:
        return not self._idle.is_set()

    def guard(self, state: Mapping[str, Any]) -> None:
        """Hook the optimizers and modules of ``state`` (each once; idempotent)."""
        for value in state.values():
            if id(value) in self._guarded:
                continue
            if isinstance(value, torch.optim.Optimizer):
                self._handles.append(value.register_step_pre_hook(self._before_step))
            elif isinstance(value, nn.Module):
                self._handles.append(value.register_forward_hook(self._after_forward))
                for module in value.modules():
                    if any(True for _ in module.buffers(recurse=False)):
                        self._handles.append(module.register_forward_pre_hook(self._before_forward))
            else:
                continue
            self._guarded.add(id(value))

    def release_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._guarded.clear()

    def begin(self) -> None:
        self._idle.clear()

    def end(self) -> None:
        self._idle.set()

    def wait(self) -> None:
        """Block until the copy in flight (if any) is done."""
        self._idle.wait()

    # -- hooks -------------------------------------------------------------------------------

    def _before_step(self, *_: Any) -> None:
        self._idle.wait()

    def _before_forward(self, *_: Any) -> None:
        self._idle.wait()

    def _after_forward(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        if self._idle.is_set():
            return
        for tensor in _tensors(output):
            if tensor.requires_grad:
                tensor.register_hook(self._before_backward)  # type: ignore[no-untyped-call]

    def _before_backward(self, grad: torch.Tensor) -> torch.Tensor:
        self._idle.wait()
        return grad


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for item in value.values() for t in _tensors(item)]
    if isinstance(value, list | tuple):
        return [t for item in value for t in _tensors(item)]
    return []


def detach_objects(leaves: Mapping[str, Any]) -> dict[str, Any]:
    """The leaves with every non-tensor one copied: training may change them once ``save()``
    has returned, and the checkpoint must hold them as they were."""
    return {
        path: value if isinstance(value, torch.Tensor) else copy.deepcopy(value)
        for path, value in leaves.items()
    }


class BackgroundSave:
    """A save whose staging runs in a thread; then the writer it was handed to takes over.

    Shaped like the other writers' handles (``thread``, ``exc_info``); ``link`` is known once
    staging is done (the incremental decision is made while copying).
    """

    def __init__(
        self, gate: UpdateGate, stage_and_start: Callable[[], tuple[Any, ChainLink | None]]
    ) -> None:
        self.exc_info: ExcInfo | None = None
        self.link: ChainLink | None = None
        self.staged = threading.Event()  # the copy is done (or failed)
        self._gate = gate
        self._stage_and_start = stage_and_start
        gate.begin()
        self.thread = threading.Thread(target=self._run, name="tml-stager", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            try:
                writing, self.link = self._stage_and_start()
            finally:
                self._gate.end()
                self.staged.set()
            writing.thread.join()
            if writing.exc_info is not None:
                self.exc_info = writing.exc_info
        except BaseException as error:
            self.exc_info = (type(error), error, error.__traceback__)
