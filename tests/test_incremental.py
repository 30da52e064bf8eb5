"""Incremental checkpoints: changed rows only, restored bit-exactly through the chain.

A state with an embedding table (sparse gradients: only the rows of the ids seen change) and
a dense layer; every save after the first is a delta until ``full_every`` starts a new chain.
Each checkpoint must restore exactly what was saved at its step, on every backend, and every
way a chain can break (parent deleted, parent saved again, plain torchsnapshot reading it)
must be named, never restored wrong.
"""

from __future__ import annotations

import json
from typing import Any

import fsspec
import pytest
import torch
import torchsnapshot

from tml_checkpointing import (
    CheckpointExistsError,
    CheckpointWriteError,
    CorruptCheckpointError,
    RetentionPolicy,
    Snapshot,
    get_checkpoints,
    get_latest_valid_checkpoint,
    materialize,
    prune,
    verify_checkpoint,
)
from tml_checkpointing.catalog.discovery import CheckpointPath
from tml_checkpointing.cli import main
from tml_checkpointing.errors import InvalidArgumentError, SnapshotStateError
from tml_checkpointing.lifecycle.deletion import children_first
from tml_checkpointing.lifecycle.retention import plan_retention
from tml_checkpointing.reading.chains import read_chain_link
from tml_checkpointing.storage.filesystem import resolve
from tml_checkpointing.writing.incremental import changed_rows

ROWS, DIM = 4096, 16  # 256 KiB table: chained with MIN_BYTES below
MIN_BYTES = 64 * 1024


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(ROWS, DIM, sparse=True)
        self.dense = torch.nn.Linear(DIM, 2)


def make_state(seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = Model()
    return {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}


def train(state: dict[str, Any], step: int, ids: int = 40) -> None:
    """One step touching ``ids`` rows of the table (about 1%)."""
    model, optimizer = state["model"], state["optimizer"]
    batch = torch.randint(0, ROWS, (ids,), generator=torch.Generator().manual_seed(step))
    optimizer.zero_grad()
    model.dense(model.table(batch)).sum().backward()
    optimizer.step()


def snapshot_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in state["model"].state_dict().items()}


def restored(checkpoint: str) -> dict[str, torch.Tensor]:
    state = make_state(seed=123)  # other values everywhere: nothing passes by accident
    Snapshot(checkpoint.rsplit("/", 1)[0], {"model": state["model"]}).restore(checkpoint)
    return snapshot_of(state)


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(actual[k], expected[k])]
    assert not different, different


def save_chain(save_dir: str, steps: int, full_every: int = 4) -> dict[int, dict[str, Any]]:
    """Train and save ``steps`` steps incrementally; what each step saved and its link."""
    state = make_state()
    snapshot = Snapshot(
        save_dir, state, incremental=True, full_every=full_every, min_chained_bytes=MIN_BYTES
    )
    saved: dict[int, dict[str, Any]] = {}
    for step in range(1, steps + 1):
        train(state, step)
        pending = snapshot.save(step)
        pending.wait()
        saved[step] = {"tensors": snapshot_of(state), "link": pending.link}
    snapshot.close()
    return saved


def test_every_checkpoint_of_a_chain_restores_exactly_on_every_backend(save_dir: str) -> None:
    saved = save_chain(save_dir, steps=6, full_every=4)
    links = {step: entry["link"] for step, entry in saved.items()}
    assert [links[s].depth for s in range(1, 7)] == [0, 1, 2, 3, 0, 1]
    assert links[2].parent == "1" and links[2].parent_id == links[1].id
    assert links[5].parent is None  # full_every=4: the 5th save starts a new chain
    table = "model/table.weight"
    assert [t.path for t in links[3].tensors] == [table]
    assert 0 < links[3].tensors[0].rows <= 40  # only the rows of the ids seen
    assert links[3].written_bytes < links[3].full_bytes / 5
    for step in range(1, 7):
        checkpoint = f"{save_dir}/{step}"
        assert verify_checkpoint(checkpoint, level="full").status == "valid"
        assert_same(restored(checkpoint), saved[step]["tensors"])
        assert read_chain_link(checkpoint) == links[step]


def test_a_delta_writes_a_fraction_of_a_full_checkpoint(tmp_path: Any) -> None:
    save_dir = str(tmp_path / "run")
    save_chain(save_dir, steps=3)
    fs = fsspec.filesystem("file")
    sizes = {step: fs.du(f"{save_dir}/{step}") for step in (1, 2, 3)}
    assert sizes[2] < sizes[1] / 4 and sizes[3] < sizes[1] / 4, sizes


def test_plain_torchsnapshot_refuses_a_delta_but_reads_a_full_one(tmp_path: Any) -> None:
    save_dir = str(tmp_path / "run")
    saved = save_chain(save_dir, steps=2)
    state = make_state(seed=5)
    torchsnapshot.Snapshot(f"{save_dir}/1").restore({"model": state["model"]})
    assert_same(snapshot_of(state), saved[1]["tensors"])
    with pytest.raises(Exception, match=r"table\.weight"):
        torchsnapshot.Snapshot(f"{save_dir}/2").restore({"model": make_state()["model"]})


def test_a_chain_whose_rows_all_change_starts_over_with_a_full_save(tmp_path: Any) -> None:
    state = make_state()
    snapshot = Snapshot(
        str(tmp_path / "run"), state, incremental=True, full_every=10, min_chained_bytes=MIN_BYTES
    )
    links = []
    for step in range(1, 5):
        with torch.no_grad():
            state["model"].table.weight.add_(1.0)  # every row
        pending = snapshot.save(step)
        pending.wait()
        links.append(pending.link)
    snapshot.close()
    # A delta of every row costs more than a full save (the indices come on top): past the
    # chain's budget (one full checkpoint), so every save is written full.
    assert [link.depth for link in links] == [0, 0, 0, 0]
    assert all(link.written_bytes == link.full_bytes for link in links)


def test_a_parent_that_went_away_makes_the_next_save_full(tmp_path: Any) -> None:
    save_dir = str(tmp_path / "run")
    state = make_state()
    snapshot = Snapshot(save_dir, state, incremental=True, min_chained_bytes=MIN_BYTES)
    snapshot.save(1).wait()
    fsspec.filesystem("file").rm(f"{save_dir}/1", recursive=True)
    train(state, 2)
    pending = snapshot.save(2)
    pending.wait()
    snapshot.close()
    assert pending.link is not None and pending.link.parent is None


def test_a_parent_saved_again_or_deleted_makes_its_delta_corrupt(tmp_path: Any) -> None:
    save_dir = str(tmp_path / "run")
    save_chain(save_dir, steps=3)
    fs = fsspec.filesystem("file")
    fs.rm(f"{save_dir}/2", recursive=True)
    # Another run saves a (full) step 2 again: step 3 was computed against the old one.
    Snapshot(save_dir, make_state(seed=9)).save(2).wait()
    report = verify_checkpoint(f"{save_dir}/3", raise_on_corrupt=False)
    assert report.status == "corrupt"
    assert f"{save_dir}/2" in report.summary() and "saved again" in report.summary()
    with pytest.raises(CorruptCheckpointError, match=r"chain (is )?broken"):
        restored(f"{save_dir}/3")
    assert get_latest_valid_checkpoint(save_dir) == f"{save_dir}/2"
    fs.rm(f"{save_dir}/1", recursive=True)  # the base of nothing valid any more
    fs.rm(f"{save_dir}/2", recursive=True)
    assert "not committed" in verify_checkpoint(f"{save_dir}/3", raise_on_corrupt=False).summary()


def test_prune_keeps_the_chain_of_a_kept_delta_and_deletes_children_first(tmp_path: Any) -> None:
    save_dir = str(tmp_path / "run")
    saved = save_chain(save_dir, steps=7, full_every=4)  # chains 1-4 and 5-7
    result = prune(save_dir, RetentionPolicy(keep_last=2))
    steps = sorted(int(p.rsplit("/", 1)[1]) for p in get_checkpoints(save_dir))
    assert steps == [5, 6, 7]  # 5 is the base of the kept deltas 6 and 7
    assert "base of the kept delta checkpoint 6" in " ".join(result.plan.reasons[5])
    assert result.deleted == [f"{save_dir}/{s}" for s in (4, 3, 2, 1)]  # children first
    for step in steps:
        assert_same(restored(f"{save_dir}/{step}"), saved[step]["tensors"])
    prune(save_dir, RetentionPolicy(keep_last=1))
    assert get_checkpoints(save_dir) == [f"{save_dir}/{s}" for s in (5, 6, 7)]


def test_retention_plan_follows_parents_without_io() -> None:
    entries = [CheckpointPath(s, f"d/{s}") for s in range(1, 7)]
    plan = plan_retention(entries, RetentionPolicy(keep_last=1), parents={6: 5, 5: 4, 3: 2})
    assert [c.step for c in plan.keep] == [4, 5, 6]
    assert [c.step for c in children_first(plan.delete, {3: 2, 2: 1})] == [3, 2, 1]
    # A parent that is gone is not "kept" (the delta is corrupt; verify says so).
    gone = [c for c in entries if c.step != 5]
    plan = plan_retention(gone, RetentionPolicy(keep_last=1), parents={6: 5, 5: 4})
    assert [c.step for c in plan.keep] == [6] and 5 not in plan.reasons


def test_load_snapshot_to_weight_rebuilds_a_chained_table(tmp_path: Any) -> None:
    save_dir = str(tmp_path / "run")
    saved = save_chain(save_dir, steps=3)
    torch_snapshot = Snapshot.get_torch_snapshot(save_dir)
    assert torch_snapshot is not None
    weight = torch.zeros(ROWS, DIM)
    Snapshot.load_snapshot_to_weight(torch_snapshot, "table.weight", weight)
    assert torch.equal(weight, saved[3]["tensors"]["table.weight"])


def test_a_resumed_incremental_run_continues_its_chain(tmp_path: Any) -> None:
    """After a restore the staging still holds the last save: the next save is a delta of
    it, and it restores to what training reached."""
    save_dir = str(tmp_path / "run")
    state = make_state()
    snapshot = Snapshot(save_dir, state, incremental=True, min_chained_bytes=MIN_BYTES)
    snapshot.save(1).wait()
    train(state, 2)
    snapshot.restore(f"{save_dir}/1")
    train(state, 3)
    pending = snapshot.save(3)
    pending.wait()
    snapshot.close()
    assert pending.link is not None and pending.link.parent == "1"
    assert_same(restored(f"{save_dir}/3"), snapshot_of(state))


def test_changed_rows_compares_bits() -> None:
    saved = torch.zeros(64, 3, dtype=torch.bfloat16)
    current = saved.clone()
    current[7, 1] = -0.0  # equal as numbers, not as bits
    current[9, 0] = float("nan")
    assert changed_rows(current, saved).tolist() == [7, 9]
    assert changed_rows(current, current.clone()).tolist() == []  # a NaN equals itself
    flags = torch.zeros(50, dtype=torch.bool)
    assert changed_rows(~flags, flags).numel() == 50
    with pytest.raises(ValueError, match="cannot compare"):
        changed_rows(torch.zeros(3, 2), torch.zeros(2, 3))


def test_bad_incremental_arguments_are_named(tmp_path: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="full_every"):
        Snapshot(str(tmp_path), incremental=True, full_every=0)
    with pytest.raises(SnapshotStateError, match="staging writer"):
        Snapshot(str(tmp_path), incremental=True, writer="torchsnapshot")
    with pytest.raises(InvalidArgumentError, match="min_chained_bytes"):
        Snapshot(str(tmp_path), incremental=True, min_chained_bytes=0)
    with pytest.raises(InvalidArgumentError, match="max_chain_fraction"):
        Snapshot(str(tmp_path), incremental=True, max_chain_fraction=-1)
    fs, _ = resolve(str(tmp_path))
    assert fs.ls(str(tmp_path)) == []  # nothing written


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    code = main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_the_cli_shows_chains_and_materializes_a_delta(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    save_dir = str(tmp_path / "run")
    saved = save_chain(save_dir, steps=3)
    code, rows = run_json(capsys, "checkpoints", "list", save_dir)
    assert code == 0
    chains = {row["step"]: row["chain"] for row in rows}
    assert chains[1]["delta"] is False and chains[3] == {
        **chains[3],
        "delta": True,
        "parent": "2",
        "depth": 2,
    }
    assert all(row["size"] < row["logical_size"] / 4 for row in rows if row["step"] > 1)

    code, described = run_json(capsys, "checkpoints", "inspect", f"{save_dir}/3")
    assert code == 0
    assert described["chain"]["base"] == f"{save_dir}/1"
    assert described["chain"]["plain_torchsnapshot_restore"] is False
    table = next(e for e in described["entries"] if e["name"] == "0/model/table.weight")
    assert table["shape"] == [ROWS, DIM] and "chain" in table["type"]
    assert not any("tml_delta" in e["name"] for e in described["entries"])

    plain = str(tmp_path / "plain" / "3")
    code, written = run_json(capsys, "checkpoints", "materialize", f"{save_dir}/3", plain)
    assert code == 0 and written["destination"] == plain
    state = make_state(seed=77)
    torchsnapshot.Snapshot(plain).restore({"model": state["model"]})  # no chain needed
    assert_same(snapshot_of(state), saved[3]["tensors"])
    assert verify_checkpoint(plain, level="full").status == "valid"
    with pytest.raises(CheckpointExistsError):
        materialize(f"{save_dir}/3", plain)

    code, pruned = run_json(capsys, "checkpoints", "prune", save_dir, "--keep-last", "1")
    assert code == 0 and pruned["deleted"] == []  # 1 and 2 are the chain of 3
    assert {k["step"]: k["reasons"] for k in pruned["keep"]}[1] == [
        "base of the kept delta checkpoint 3"
    ]


def test_prune_reports_the_bytes_it_freed(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    save_dir = str(tmp_path / "run")
    save_chain(save_dir, steps=6, full_every=3)  # chains 1-3 and 4-6
    sizes = {s: fsspec.filesystem("file").du(f"{save_dir}/{s}") for s in (1, 2, 3)}
    code, pruned = run_json(capsys, "checkpoints", "prune", save_dir, "--keep-last", "1")
    assert code == 0
    assert sorted(pruned["deleted"]) == [f"{save_dir}/{s}" for s in (1, 2, 3)]
    assert pruned["freed_bytes"] == sum(sizes.values())
    for step in (4, 5, 6):
        assert verify_checkpoint(f"{save_dir}/{step}", level="full").status == "valid"


def test_a_save_that_failed_after_staging_makes_the_next_one_full(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The staging then holds rows of a save that never committed: a delta computed against
    it would be missing them. The next save must be full, and restore exactly."""
    save_dir = str(tmp_path / "run")
    state = make_state()
    snapshot = Snapshot(save_dir, state, incremental=True, min_chained_bytes=MIN_BYTES)
    snapshot.save(1).wait()
    train(state, 2)

    class Refusing:
        def start(self) -> None:
            return None

        def submit(self, *args: Any, **kwargs: Any) -> Any:
            raise OSError("the writer is gone")

    with monkeypatch.context() as patch:
        patch.setattr("tml_checkpointing.writing.writers.shared_writer", lambda: Refusing())
        with pytest.raises(CheckpointWriteError, match="the writer is gone"):
            snapshot.save(2)
    train(state, 3)
    pending = snapshot.save(3)
    pending.wait()
    snapshot.close()
    assert pending.link is not None and pending.link.parent is None
    assert_same(restored(f"{save_dir}/3"), snapshot_of(state))
