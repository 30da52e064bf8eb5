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
from torchsnapshot import StateDict

from tml_checkpointing import Snapshot
from tml_checkpointing.writing import staging

WAIT = 60.0  # generous: the suite runs on loaded machines


class _HeldCopy:
    """Makes every ``StagingArea.stage`` wait until ``release`` (set by training's hook)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reached = threading.Event()
        self.copies_started = 0
        original = staging.StagingArea.stage

        def held(area: staging.StagingArea, *args: Any, **kwargs: Any) -> Any:
            self.copies_started += 1
            assert self.reached.wait(WAIT), "training never reached its update during a copy"
            self.reached.clear()
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
    # Registered before the Snapshot's own hook, so it runs first: it tells the held copy
    # that training is at its update, and the Snapshot's hook then holds the update.
    optimizer.register_step_pre_hook(lambda *_: held_copy.reached.set())
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
        for step in range(1, 6):
            expected[step] = _values(state)
            pending = snapshot.save(step)
            assert not pending.staged(timeout=0), "save() waited for the copy"
            train(batches[step])  # changes every tensor saved, while the copy is pending
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
    """A table updated inside the backward pass (as TorchRec's fused optimizers do)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(512, 16))
        self.table.register_hook(self._update)

    def _update(self, grad: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.table.sub_(0.1 * grad)
        return grad

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
