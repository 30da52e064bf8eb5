"""The in-place restore path (tml_checkpointing.reading.fast_restore) against torchsnapshot's own.

Both paths must give the same state from the same checkpoint, whichever writer wrote it; the
fast path must be the one taken for local one-rank checkpoints, verify what it reads, and
leave everything it cannot do exactly to torchsnapshot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torchsnapshot
from torchsnapshot import RNGState, StateDict

from tml_checkpointing import CorruptCheckpointError, Snapshot
from tml_checkpointing.format.layout import INTEGRITY_SIDECAR


class Odd(torch.nn.Module):
    """Tensors the fast path must handle: 16-bit floats, 0-dim, int64 and bool buffers.

    No empty tensor (torchsnapshot 0.1.0 cannot read one back), and bfloat16 only through the
    writer process (torchsnapshot's own writer fails on a small bfloat16 tensor: its batcher
    expects 462 bytes of ``torch.save`` output and gets 460).
    """

    def __init__(self, half: torch.dtype) -> None:
        super().__init__()
        self.brain = torch.nn.Parameter(torch.randn(33, 7).to(half))
        self.register_buffer("scalar", torch.tensor(3.5))
        self.register_buffer("counts", torch.randint(0, 1 << 40, (1000,)))
        self.register_buffer("mask", torch.rand(77) > 0.5)


def make_state(seed: int, half: torch.dtype = torch.float16) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.ReLU(), torch.nn.Linear(300, 5))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(8, 64)).sum().backward()
        optimizer.step()
    return {
        "model": model,
        "odd": Odd(half),
        "optimizer": optimizer,
        "extra": StateDict(epoch=seed, name=f"run-{seed}", lr=0.5, table=torch.arange(10)),
        "rng": RNGState(),
    }


def fresh_state(half: torch.dtype = torch.float16) -> dict[str, Any]:
    """Another seed, and an optimizer that has never stepped (no state tensors to land in)."""
    state = make_state(99, half)
    state["optimizer"] = torch.optim.Adam(state["model"].parameters(), lr=1e-3)
    return state


def everything(state: dict[str, Any]) -> dict[str, Any]:
    """Every leaf of the state but the RNG's (that one is the process's, compared apart)."""
    flat: dict[str, Any] = {}
    for key, stateful in state.items():
        if isinstance(stateful, RNGState):
            continue
        _, leaves = torchsnapshot.flatten.flatten(stateful.state_dict(), prefix=key)
        flat.update(leaves)
    return flat


def assert_identical(left: dict[str, Any], right: dict[str, Any]) -> None:
    assert left.keys() == right.keys()
    for path, value in left.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == right[path].dtype and torch.equal(value, right[path]), path
        else:
            assert value == right[path], path


@pytest.mark.parametrize(
    ("writer", "half"), [("process", torch.bfloat16), ("torchsnapshot", torch.float16)]
)
def test_same_state_as_torchsnapshot_restore_from_either_writer(
    tmp_path: Path, writer: str, half: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved = make_state(1, half)
    rng_at_save = torch.get_rng_state()
    with Snapshot(str(tmp_path), saved, writer=writer) as snapshot:
        checkpoint = snapshot.save(7).wait()
    expected = everything(saved)

    by_torchsnapshot = fresh_state(half)
    torchsnapshot.Snapshot(checkpoint).restore(by_torchsnapshot)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a local one-rank checkpoint must not go through torchsnapshot")

    monkeypatch.setattr(torchsnapshot.Snapshot, "restore", refuse)
    in_place = fresh_state(half)
    weight = in_place["model"][0].weight
    torch.manual_seed(1234)  # the RNG state must come back from the checkpoint
    Snapshot(str(tmp_path), in_place).restore(checkpoint)
    assert torch.equal(torch.get_rng_state(), rng_at_save)

    assert_identical(everything(by_torchsnapshot), everything(in_place))
    assert_identical(expected, everything(in_place))
    assert in_place["model"][0].weight is weight  # restored in place, not replaced


def test_a_subset_of_keys_restores_only_those(tmp_path: Path) -> None:
    saved = make_state(2)
    checkpoint = Snapshot(str(tmp_path), saved).save(1).wait()
    target = fresh_state()
    untouched = target["odd"].brain.detach().clone()
    Snapshot(str(tmp_path), target).restore(checkpoint, keys=["model"])
    assert torch.equal(target["model"][2].bias, saved["model"][2].bias)
    assert torch.equal(target["odd"].brain, untouched)


def test_every_byte_read_is_verified(tmp_path: Path) -> None:
    saved = make_state(3)
    checkpoint = Path(Snapshot(str(tmp_path), saved).save(1).wait())
    data = max(
        (p for p in checkpoint.rglob("*") if p.is_file() and p.name != INTEGRITY_SIDECAR),
        key=lambda p: p.stat().st_size,
    )
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit, same size: only a checksum can see it
    data.write_bytes(bytes(raw))
    relative = data.relative_to(checkpoint).as_posix()
    with pytest.raises(CorruptCheckpointError, match=relative) as caught:
        Snapshot(str(tmp_path), fresh_state()).restore(str(checkpoint))
    assert caught.value.path == relative
    # verify="size" trusts the bytes (sizes are right): it restores, the flip included
    Snapshot(str(tmp_path), fresh_state()).restore(str(checkpoint), verify="size")


def test_what_the_fast_path_cannot_do_goes_to_torchsnapshot(
    memory_save_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved = make_state(4)
    checkpoint = Snapshot(memory_save_dir, saved).save(1).wait()
    calls: list[str] = []
    original = torchsnapshot.Snapshot.restore

    def counting(self: torchsnapshot.Snapshot, app_state: Any) -> None:
        calls.append(self.path)
        original(self, app_state)

    monkeypatch.setattr(torchsnapshot.Snapshot, "restore", counting)
    target = fresh_state()
    Snapshot(memory_save_dir, target).restore(checkpoint)  # memory://: not a local file
    assert calls
    assert_identical(everything(saved), everything(target))
