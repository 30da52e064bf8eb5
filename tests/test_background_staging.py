"""``Snapshot(background_staging=True)``: ``save()`` returns before the copy, never a torn state.

Each test makes the copy wait until training has *reached* its next in-place update (the
optimizer's step, or an update inside the backward pass as TorchRec's fused optimizers do it),
so the update provably comes while the copy is pending; then checks that every checkpoint
holds exactly the values of the step it was saved at, bit for bit.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torchsnapshot import StateDict

from tml_checkpointing import Snapshot
from tml_checkpointing.writing import staging
from tml_checkpointing.writing.background import UpdateGate

WAIT = 60.0  # generous: the suite runs on loaded machines (a failing gate waits this long)


class _HeldCopy:
    """Makes every ``StagingArea.stage`` wait until training has reached its next update
    (``reached``, set by the test's own hook) *and* is being held there by the Snapshot's
    gate: so the update provably comes while the copy is pending, and without the gate the
    copy would never start (the test then fails on the wait)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reached = threading.Event()
        self.copies_started = 0
        self.gate: UpdateGate | None = None
        original = staging.StagingArea.stage

        def held(area: staging.StagingArea, *args: Any, **kwargs: Any) -> Any:
            self.copies_started += 1
            assert self.reached.wait(WAIT), "training never reached its update during a copy"
            self.reached.clear()
            assert self.gate is not None
            assert self.gate.holding.wait(WAIT), "training's update was not held for the copy"
            return original(area, *args, **kwargs)

        monkeypatch.setattr(staging.StagingArea, "stage", held)


@pytest.fixture
def held_copy(monkeypatch: pytest.MonkeyPatch) -> Iterator[_HeldCopy]:
    yield _HeldCopy(monkeypatch)


def _values(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {f"params/{k}": v.detach().clone() for k, v in state["params"].items()}
    for index, per_param in state["optimizer"].state_dict()["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                out[f"optimizer/{index}/{name}"] = value.clone()
    return out


def _params_and_adam(seed: int) -> tuple[StateDict, torch.optim.Adam]:
    """Weights as plain tensors (no module: only the optimizer's step changes them)."""
    generator = torch.Generator().manual_seed(seed)
    params = StateDict(
        w1=torch.randn(64, 256, generator=generator).requires_grad_(),
        w2=torch.randn(256, 8, generator=generator).requires_grad_(),
    )
    return params, torch.optim.Adam([params["w1"], params["w2"]], lr=0.05)


def test_optimizer_step_waits_for_the_copy_and_each_checkpoint_holds_its_step(
    tmp_path: Path, held_copy: _HeldCopy
) -> None:
    params, optimizer = _params_and_adam(0)
    # A process-wide step hook registered before the Snapshot's own, so it runs first: it
    # tells the held copy that training is at its update; the Snapshot's hook then holds it.
    signal = register_optimizer_step_pre_hook(lambda *_: held_copy.reached.set())
    try:
        state = {"params": params, "optimizer": optimizer}
        expected: dict[int, dict[str, torch.Tensor]] = {}
        batches = torch.randn(6, 32, 64, generator=torch.Generator().manual_seed(1))

        def train(batch: torch.Tensor) -> None:
            (batch @ params["w1"]).relu().matmul(params["w2"]).pow(2).mean().backward()
            optimizer.step()  # held by the Snapshot's hook until the pending copy is done
            optimizer.zero_grad()

        train(batches[0])  # before any save: Adam's state exists in every checkpoint
        held_copy.reached.clear()  # each copy below waits for the step after its save
        with Snapshot(str(tmp_path), state, background_staging=True) as snapshot:
            held_copy.gate = snapshot._writers.gate
            for step in range(1, 6):
                expected[step] = _values(state)
                pending = snapshot.save(step)
                assert not pending.staged(timeout=0), "save() waited for the copy"
                train(batches[step])  # changes every tensor saved, while the copy is pending
                assert pending.held_training_s > 0  # the step was held, and that was counted
    finally:
        signal.remove()
    assert held_copy.copies_started == 5
    for step, values in expected.items():
        fresh_params, fresh_optimizer = _params_and_adam(2)
        fresh_params["w1"].sum().backward()
        fresh_optimizer.step()  # Adam's state must exist to be loaded into
        fresh = {"params": fresh_params, "optimizer": fresh_optimizer}
        Snapshot(str(tmp_path), fresh).restore(str(tmp_path / str(step)))
        restored = _values(fresh)
        assert sorted(restored) == sorted(values)
        differing = [k for k in values if not torch.equal(values[k], restored[k])]
        assert differing == [], f"step {step} is torn: {differing}"


class _FusedUpdate(nn.Module):
    """A table updated inside the backward pass (as TorchRec's fused optimizers do), through
    PyTorch's optimizer-in-backward API."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(512, 16))
        _apply_optimizer_in_backward(torch.optim.SGD, [self.table], {"lr": 0.1})

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids].sum(dim=1)


def test_an_update_inside_backward_waits_for_the_copy(tmp_path: Path, held_copy: _HeldCopy) -> None:
    torch.manual_seed(1)
    model = _FusedUpdate()

    def note_backward(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        # Registered before the Snapshot's forward hook: this gradient hook runs first.
        output.register_hook(lambda grad: (held_copy.reached.set(), grad)[1])

    model.register_forward_hook(note_backward)
    expected = {}
    with Snapshot(str(tmp_path), {"model": model}, background_staging=True) as snapshot:
        held_copy.gate = snapshot._writers.gate
        for step in range(1, 5):
            ids = torch.randint(0, 512, (8, 4), generator=torch.Generator().manual_seed(step))
            expected[step] = model.table.detach().clone()
            snapshot.save(step)
            model(ids).sum().backward()  # updates the table in backward, after the copy
    assert held_copy.copies_started == 4
    for step, table in expected.items():
        fresh = _FusedUpdate()
        Snapshot(str(tmp_path), {"model": fresh}).restore(str(tmp_path / str(step)))
        assert torch.equal(fresh.table.detach(), table), f"step {step} is torn"
