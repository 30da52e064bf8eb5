"""Snapshot: round trips on all backends, async consistency, legacy and partial restore."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torchsnapshot
from torchsnapshot import RNGState, StateDict

from tml_checkpointing import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    InvalidStepError,
    Snapshot,
    SnapshotEntryNotFoundError,
    SnapshotStateError,
    StepTypeError,
    get_checkpoint,
    get_checkpoints,
)
from tml_checkpointing.storage.plugin import FsspecStoragePlugin


def make_state(seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 8)).pow(2).mean().backward()
        optimizer.step()
    return {"model": model, "optimizer": optimizer}


def tensors_of(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    flat: dict[str, torch.Tensor] = {}
    for name, param in state["model"].state_dict().items():
        flat[f"model.{name}"] = param.detach().clone()
    for index, per_param in state["optimizer"].state_dict()["state"].items():
        for key, value in per_param.items():
            flat[f"optimizer.{index}.{key}"] = torch.as_tensor(value).clone()
    return flat


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def perturb(state: dict[str, Any]) -> None:
    with torch.no_grad():
        for param in state["model"].parameters():
            param.add_(1.0)
    state["optimizer"].zero_grad()
    state["model"](torch.randn(4, 8)).sum().backward()
    state["optimizer"].step()


def test_round_trip_restores_state_step_walltime_and_rng(save_dir: str) -> None:
    state = make_state()
    snapshot = Snapshot(save_dir, {**state, "rng": RNGState()})
    snapshot.walltime = 12.5
    expected = tensors_of(state)
    path = snapshot.save(300).wait()
    after_save = torch.rand(3)
    assert path == f"{save_dir}/300"

    perturb(state)
    torch.rand(10)
    restored = Snapshot(save_dir, {**state, "rng": RNGState()})
    restored.restore(get_checkpoint(save_dir))
    assert_same(tensors_of(state), expected)
    assert (restored.step, restored.walltime) == (300, 12.5)
    assert torch.equal(torch.rand(3), after_save)


def test_async_save_is_consistent_while_training_continues(save_dir: str) -> None:
    state = make_state()
    counters = StateDict(history=[1, 2])
    snapshot = Snapshot(save_dir, {**state, "counters": counters})
    expected = tensors_of(state)
    pending = snapshot.save(1)
    perturb(state)  # training goes on before the write finishes
    counters["history"].append(3)
    snapshot.step = 999
    pending.wait()
    assert pending.done()

    fresh = make_state(seed=1)
    fresh_counters = StateDict(history=[])
    restored = Snapshot(save_dir, {**fresh, "counters": fresh_counters})
    restored.restore(pending.path)
    assert_same(tensors_of(fresh), expected)
    assert fresh_counters["history"] == [1, 2]
    assert restored.step == 1


def test_restore_of_checkpoint_without_walltime(tmp_path: Path) -> None:
    """Checkpoints from before walltime existed (plain torchsnapshot, step only)."""
    state = make_state()
    torchsnapshot.Snapshot.take(str(tmp_path / "7"), {**state, "extra_state": StateDict(step=7)})
    snapshot = Snapshot(str(tmp_path), make_state(seed=3))
    snapshot.walltime = 99.0
    snapshot.restore(get_checkpoint(str(tmp_path)))
    assert (snapshot.step, snapshot.walltime) == (7, 0.0)
    assert_same(tensors_of(snapshot.state), tensors_of(state))  # type: ignore[arg-type]


def test_plain_torchsnapshot_reads_our_local_checkpoints(tmp_path: Path) -> None:
    state = make_state()
    Snapshot(str(tmp_path), state).save(5).wait()
    fresh = make_state(seed=4)
    extra = StateDict(step=-1, walltime=-1.0)
    torchsnapshot.Snapshot(str(tmp_path / "5")).restore({**fresh, "extra_state": extra})
    assert_same(tensors_of(fresh), tensors_of(state))
    assert extra["step"] == 5


def test_partial_restore_keys_for_warm_start(tmp_path: Path) -> None:
    state = make_state()
    Snapshot(str(tmp_path), state).save(50).wait()
    fresh = make_state(seed=5)
    optimizer_before = tensors_of(fresh)
    snapshot = Snapshot(str(tmp_path), fresh)
    snapshot.restore(get_checkpoint(str(tmp_path)), keys=["model"])
    now = tensors_of(fresh)
    assert all(torch.equal(now[k], tensors_of(state)[k]) for k in now if k.startswith("model."))
    assert all(torch.equal(now[k], optimizer_before[k]) for k in now if k.startswith("optimizer."))
    assert snapshot.step == 0


def test_restore_reads_each_stored_file_once(
    memory_save_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchsnapshot 0.1.0 reads the whole checkpoint once per state key; we read it once.
    (memory://: restores that are not from local disk go through torchsnapshot.)"""
    state = make_state()
    Snapshot(memory_save_dir, {**state, "rng": RNGState()}).save(1).wait()
    reads: list[tuple[str, Any]] = []
    original = FsspecStoragePlugin.read

    async def counting_read(self: FsspecStoragePlugin, read_io: Any) -> None:
        reads.append((read_io.path, read_io.byte_range))
        await original(self, read_io)

    monkeypatch.setattr(FsspecStoragePlugin, "read", counting_read)
    fresh = Snapshot(memory_save_dir, {**make_state(1), "rng": RNGState()})
    fresh.restore(f"{memory_save_dir}/1")
    data_reads = [read for read in reads if read[0] != ".snapshot_metadata"]
    assert data_reads and len(data_reads) == len(set(data_reads))


def test_restore_errors_are_named(tmp_path: Path) -> None:
    state = make_state()
    Snapshot(str(tmp_path), {"model": state["model"]}).save(1).wait()
    snapshot = Snapshot(str(tmp_path), state)
    with pytest.raises(CheckpointNotFoundError, match="not a committed checkpoint"):
        snapshot.restore(str(tmp_path / "2"))
    with pytest.raises(CheckpointMismatchError, match=r"has no \['optimizer'\]"):
        snapshot.restore(str(tmp_path / "1"))
    with pytest.raises(SnapshotStateError, match="not in this Snapshot's state"):
        snapshot.restore(str(tmp_path / "1"), keys=["nope"])


@pytest.mark.parametrize("bad_step", [{"model": 1}, "10", 3.0, True, None])
def test_save_with_non_integer_explains_signature(tmp_path: Path, bad_step: Any) -> None:
    snapshot = Snapshot(str(tmp_path), make_state())
    with pytest.raises(TypeError, match=r"save\(global_step\) takes the integer training step"):
        snapshot.save(bad_step)
    with pytest.raises(StepTypeError):
        snapshot.save(bad_step)
    assert get_checkpoints(str(tmp_path)) == []


def test_negative_step_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidStepError, match=">= 0"):
        Snapshot(str(tmp_path), make_state()).save(-1)


def test_state_given_later_and_callers_dict_untouched(tmp_path: Path) -> None:
    state = make_state()
    snapshot = Snapshot(str(tmp_path))
    with pytest.raises(SnapshotStateError, match="nothing to save"):
        snapshot.save(1)
    snapshot.state = state
    snapshot.save(1)
    snapshot.close()
    assert set(state) == {"model", "optimizer"}
    assert get_checkpoints(str(tmp_path)) == [str(tmp_path / "1")]


def test_non_stateful_state_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SnapshotStateError, match=r"state\['lr'\] is a float"):
        Snapshot(str(tmp_path), {"lr": 0.1})


def test_committed_checkpoint_is_never_overwritten(save_dir: str) -> None:
    state = make_state()
    with Snapshot(save_dir, state) as snapshot:
        snapshot.save(10)
    expected = tensors_of(state)
    perturb(state)
    with pytest.raises(CheckpointExistsError, match="refusing to overwrite"):
        Snapshot(save_dir, state).save(10)
    fresh = make_state(seed=9)
    Snapshot(save_dir, fresh).restore(get_checkpoint(save_dir))
    assert_same(tensors_of(fresh), expected)


class _Unpicklable:
    def state_dict(self) -> dict[str, Any]:
        return {"callback": _Unpicklable.LocalThing()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass

    class LocalThing:
        def __reduce__(self) -> Any:
            raise RuntimeError("cannot pickle LocalThing")

        def __deepcopy__(self, memo: Any) -> Any:
            return self


def test_failed_staging_commits_nothing(save_dir: str) -> None:
    snapshot = Snapshot(save_dir, {**make_state(), "bad": _Unpicklable()})
    with pytest.raises(CheckpointWriteError, match=r"nothing was committed.*cannot pickle"):
        snapshot.save(3)
    assert get_checkpoints(save_dir) == []


def test_failed_background_write_commits_nothing(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file where a directory should be")
    snapshot = Snapshot(str(tmp_path / "blocker" / "run"), make_state())
    # torchsnapshot may start writing small states before async_take returns, so the
    # failure surfaces from save() or from wait(): either way as CheckpointWriteError.
    with pytest.raises(CheckpointWriteError, match="nothing was committed") as caught:
        snapshot.save(3).wait()
    assert isinstance(caught.value, OSError)
    assert snapshot._pending is None or snapshot._pending.done()


def test_failed_s3_write_commits_nothing(s3_server: Any) -> None:
    save_dir = "s3://no-such-bucket-here/run"
    # A missing bucket is named (and never created): StorageLocationNotFoundError.
    with pytest.raises(CheckpointError, match="no-such-bucket-here' does not exist"):
        Snapshot(save_dir, make_state()).save(3).wait()
    assert get_checkpoints(save_dir) == []


def test_get_torch_snapshot_and_partial_load(save_dir: str) -> None:
    state = make_state()
    Snapshot(save_dir, state).save(4).wait()
    torch_snapshot = Snapshot.get_torch_snapshot(save_dir)
    assert torch_snapshot is not None
    target = torch.zeros(16, 8)
    Snapshot.load_snapshot_to_weight(torch_snapshot, "model/0.weight", target)
    assert torch.equal(target, state["model"][0].weight)
    bias = torch.zeros(2)
    Snapshot.load_snapshot_to_weight(torch_snapshot, "2.bias", bias)  # unique part of the name
    assert torch.equal(bias, state["model"][2].bias)


def test_partial_load_errors_name_what_exists(tmp_path: Path) -> None:
    state = make_state()
    Snapshot(str(tmp_path), state).save(4).wait()
    torch_snapshot = Snapshot.get_torch_snapshot(str(tmp_path), global_step=4)
    assert torch_snapshot is not None
    with pytest.raises(
        SnapshotEntryNotFoundError, match=r"'user_table' matches no tensor.*model/0.weight"
    ):
        Snapshot.load_snapshot_to_weight(torch_snapshot, "user_table", torch.zeros(1))
    with pytest.raises(SnapshotEntryNotFoundError, match=r"'weight' is ambiguous"):
        Snapshot.load_snapshot_to_weight(torch_snapshot, "weight", torch.zeros(1))
    with pytest.raises(SnapshotStateError, match=r"shape \[16, 8\]"):
        Snapshot.load_snapshot_to_weight(torch_snapshot, "model/0.weight", torch.zeros(3))
    assert Snapshot.get_torch_snapshot(str(tmp_path / "none"), missing_ok=True) is None
    with pytest.raises(CheckpointNotFoundError):
        Snapshot.get_torch_snapshot(str(tmp_path), global_step=5)


def test_local_commit_leaves_only_a_complete_marker(tmp_path: Path) -> None:
    Snapshot(str(tmp_path), make_state()).save(1).wait()
    names = [p.name for p in (tmp_path / "1").iterdir()]
    assert ".snapshot_metadata" in names
    assert not [n for n in names if n.endswith(".tmp")]
    assert (tmp_path / "1" / ".snapshot_metadata").stat().st_size > 0


def test_a_failure_already_raised_does_not_poison_the_next_save(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file where a directory should be")
    snapshot = Snapshot(str(tmp_path / "blocker" / "run"), make_state())
    with pytest.raises(CheckpointWriteError):
        snapshot.save(3).wait()
    (tmp_path / "blocker").unlink()
    assert snapshot.save(3).wait().endswith("/3")  # the old error is not raised again
