"""CUDA state through the writer process: page-locked staging, non-blocking copies.

Skipped without CUDA (the CI machines have none); run on a GPU machine with
``.venv/bin/python -m pytest tests/test_gpu_staging.py -p no:xdist -q``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tml_checkpointing import Snapshot
from tml_checkpointing.writing.save_plan import plan_save

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 2048), nn.ReLU(), nn.Linear(2048, 512)).cuda()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(8, 512, device="cuda")).sum().backward()
    optimizer.step()
    return model, optimizer


def test_cuda_state_is_staged_pinned_and_restores_bit_exactly(tmp_path: Path) -> None:
    model, optimizer = _model()
    state = {"model": model, "optimizer": optimizer}
    with Snapshot(str(tmp_path), state) as snapshot:
        pending = snapshot.save(1)
        area = snapshot._staging.area
        assert area is not None and area.plan.on_cuda
        assert area._pinned is not None and area._pinned.registered
        pending.wait()
    expected = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    fresh, fresh_optimizer = _model()
    with torch.no_grad():
        for parameter in fresh.parameters():
            parameter.zero_()
    Snapshot(str(tmp_path), {"model": fresh, "optimizer": fresh_optimizer}).restore(
        str(tmp_path / "1")
    )
    for key, value in fresh.state_dict().items():
        assert value.is_cuda
        assert torch.equal(value.cpu(), expected[key]), key


def test_a_cuda_plan_places_every_tensor(tmp_path: Path) -> None:
    model, _ = _model()
    plan = plan_save({f"model/{k}": v for k, v in model.state_dict().items()})
    assert plan is not None and {slot.device for slot in plan.slots} == {"cuda:0"}


def test_background_staging_of_cuda_state_holds_the_step(tmp_path: Path) -> None:
    model, optimizer = _model()
    state = {"model": model, "optimizer": optimizer}
    with Snapshot(str(tmp_path), state, background_staging=True) as snapshot:
        expected = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        snapshot.save(1)
        model(torch.randn(8, 512, device="cuda")).sum().backward()
        optimizer.step()  # waits for the copy
    fresh, fresh_optimizer = _model()
    Snapshot(str(tmp_path), {"model": fresh, "optimizer": fresh_optimizer}).restore(
        str(tmp_path / "1")
    )
    for key, value in fresh.state_dict().items():
        assert torch.equal(value.cpu(), expected[key]), key
