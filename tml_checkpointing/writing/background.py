"""Staging in the background: ``save()`` returns at once, training's next update waits for it.

Why: copying the state into the staging block is the only part of a save the training process
pays for, and peers (DCP ``async_save``, torch-checkpointing) return from ``save()`` in
milliseconds and copy while the next step's forward pass runs. Doing the same must never
save a torn state, so the state is protected until its copy is done: an :class:`UpdateGate`
hooks the places where training changes the saved tensors in place, and they wait there for
the copy, only if they reach it first:

* every optimizer's ``step`` in the process (a global step pre-hook: also an optimizer that
  is not saved but updates a saved module), TorchRec's ``KeyedOptimizer`` and
  ``CombinedOptimizer`` included;
* the backward pass of a saved module whose parameters are updated *inside* backward
  (TorchRec's fused optimizers: a ``DistributedModelParallel`` with ``fused_optimizer``, or
  parameters given an optimizer by ``apply_optimizer_in_backward``), through a gradient hook
  on each output tensor of its forward, so the wait comes before backward starts;
* the forward pass of a saved submodule that holds buffers (batch-norm statistics change in
  forward).

Other modules' backward runs on while the copy goes on: gradients are not saved state.
Changes made another way (``with torch.no_grad(): p -= ...`` by hand, tensors of a plain
``StateDict`` changed in place) are not seen: use ``background_staging=False`` for such loops.
Non-tensor leaves are copied in the training thread before ``save()`` returns.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from ..format.chain_link import ChainLink

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


class UpdateGate:
    """Holds training's in-place updates of the saved state while a copy of it is made."""

    def __init__(self) -> None:
        self._idle = threading.Event()
        self._idle.set()
        self._handles: list[RemovableHandle] = []
        self._step_hook: RemovableHandle | None = None  # every optimizer's step, process-wide
        self._guarded: set[int] = set()  # ids of the objects hooked
        self.holding = threading.Event()  # a hook is holding training for the copy in flight
        self._copy = 0  # number of the copy in flight (or the last one)
        self._held: dict[int, float] = {}  # copy number -> seconds training waited for it

    @property
    def copying(self) -> bool:
        return not self._idle.is_set()

    def guard(self, state: Mapping[str, Any]) -> None:
        """Hook every optimizer step, and the modules of ``state`` (each once; idempotent)."""
        if self._step_hook is None:
            self._step_hook = register_optimizer_step_pre_hook(self._before_step)
        for value in state.values():
            if id(value) in self._guarded or not isinstance(value, nn.Module):
                continue
            if updates_in_backward(value):
                self._handles.append(value.register_forward_hook(self._after_forward))
            for module in value.modules():
                if any(True for _ in module.buffers(recurse=False)):
                    self._handles.append(module.register_forward_pre_hook(self._before_forward))
            self._guarded.add(id(value))

    def release_hooks(self) -> None:
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._guarded.clear()

    def begin(self) -> int:
        """A copy starts; its number (for :meth:`held_for`)."""
        self._copy += 1
        self._held = {self._copy: 0.0}  # only the newest copy's figure is kept
        self.holding.clear()
        self._idle.clear()
        return self._copy

    def held_for(self, copy_number: int) -> float:
        """Seconds training's updates waited for that copy (what the save cost training)."""
        return self._held.get(copy_number, 0.0)

    def end(self) -> None:
        self._idle.set()

    def wait(self) -> None:
        """Block until the copy in flight (if any) is done."""
        self._idle.wait()

    # -- hooks -------------------------------------------------------------------------------

    def _hold(self) -> None:
        if self._idle.is_set():
            return
        copy_number, started = self._copy, time.perf_counter()
        self.holding.set()
        self._idle.wait()
        if copy_number in self._held:
            self._held[copy_number] += time.perf_counter() - started

    def _before_step(self, *_: Any) -> None:
        self._hold()

    def _before_forward(self, *_: Any) -> None:
        self._hold()

    def _after_forward(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        if self._idle.is_set():
            return
        for tensor in _tensors(output):
            if tensor.requires_grad:
                tensor.register_hook(self._before_backward)  # type: ignore[no-untyped-call]

    def _before_backward(self, grad: torch.Tensor) -> torch.Tensor:
        self._hold()
        return grad


def updates_in_backward(module: nn.Module) -> bool:
    """Whether backward changes the module's parameters (optimizers applied in backward)."""
    if isinstance(getattr(type(module), "fused_optimizer", None), property):
        return True  # TorchRec's DistributedModelParallel (fused embedding optimizers)
    return any(hasattr(parameter, "_in_backward_optimizers") for parameter in module.parameters())


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
        self._copy = gate.begin()
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

    @property
    def held_training_s(self) -> float:
        """Seconds training's updates waited for this save's copy so far."""
        return self._gate.held_for(self._copy)
