"""Retention: property tests of the plan, prune on every backend, prune racing an async save,
metrics for keep_best, and stale incomplete-directory cleanup."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import fsspec
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tml_checkpointing import (
    CheckpointPath,
    InvalidArgumentError,
    NotASaveDirError,
    RetentionPolicy,
    Snapshot,
    clean_incomplete,
    find_incomplete,
    get_checkpoints,
    get_latest_valid_checkpoint,
    mark_done_eval,
    plan_retention,
    prune,
    read_checkpoint_metrics,
    verify_checkpoint,
    write_checkpoint_metrics,
)
from tml_checkpointing.events import SAVE_DATA_WRITTEN, Event, subscribe, unsubscribe

# -- the plan, property-tested -----------------------------------------------------------------

entries_strategy = st.dictionaries(
    st.integers(min_value=0, max_value=400), st.booleans(), min_size=0, max_size=40
)
policy_strategy = st.builds(
    RetentionPolicy,
    keep_last=st.integers(min_value=1, max_value=5),
    keep_every_steps=st.none() | st.integers(min_value=1, max_value=100),
    keep_best=st.none() | st.integers(min_value=1, max_value=4),
    best_metric=st.just("loss"),
    best_mode=st.sampled_from(["min", "max"]),
    keep_until_evaluated=st.lists(st.sampled_from(["val", "test"]), max_size=2, unique=True),
)


@settings(max_examples=300, deadline=None)
@given(entries=entries_strategy, policy=policy_strategy, data=st.data())
def test_plan_keeps_what_the_policy_promises(
    entries: dict[int, bool], policy: RetentionPolicy, data: st.DataObject
) -> None:
    checkpoints = [CheckpointPath(s, f"/run/{s}", committed=c) for s, c in entries.items()]
    committed = sorted(s for s, c in entries.items() if c)
    metrics = {
        s: data.draw(st.floats(-10, 10, allow_nan=False))
        for s in committed
        if data.draw(st.booleans())
    }
    evaluated = {s: set(data.draw(st.sets(st.sampled_from(["val", "test"])))) for s in committed}
    latest_valid = data.draw(st.sampled_from(committed)) if committed else None
    plan = plan_retention(
        checkpoints,
        policy,
        metrics,
        evaluated,
        protect=() if latest_valid is None else (latest_valid,),
    )
    kept = {c.step for c in plan.keep}
    deleted = {c.step for c in plan.delete}
    assert kept | deleted == set(entries) and not kept & deleted
    assert all(entries[s] for s in deleted), "an uncommitted directory was planned for deletion"
    assert set(committed[-policy.keep_last :]) <= kept
    if latest_valid is not None:
        assert latest_valid in kept
    if policy.keep_every_steps:
        assert {s for s in committed if s % policy.keep_every_steps == 0} <= kept
    if policy.keep_best:
        sign = 1 if policy.best_mode == "min" else -1
        for step in deleted & set(metrics):
            better_or_equal_kept = [
                s for s in kept & set(metrics) if sign * metrics[s] <= sign * metrics[step]
            ]
            assert len(better_or_equal_kept) >= policy.keep_best
    for step in committed:
        if not set(policy.keep_until_evaluated) <= evaluated[step]:
            assert step in kept
    assert all(plan.reasons[s] for s in kept)


def test_policy_validation() -> None:
    with pytest.raises(
        ValueError, match=r"keep_last\n  Input should be greater than or equal to 1"
    ):
        RetentionPolicy(keep_last=0)
    with pytest.raises(
        ValueError, match=r"keep_every_steps\n  Input should be greater than or equal to 1"
    ):
        RetentionPolicy(keep_last=1, keep_every_steps=-5)
    with pytest.raises(ValueError, match="best_metric"):
        RetentionPolicy(keep_last=1, keep_best=2)


# -- prune against storage ---------------------------------------------------------------------


def make_state() -> dict[str, torch.nn.Module]:
    return {"model": torch.nn.Linear(32, 32)}


def fill(save_dir: str, steps: list[int]) -> None:
    with Snapshot(save_dir, make_state()) as snapshot:
        for step in steps:
            snapshot.save(step)


def steps_in(save_dir: str) -> list[int]:
    return [int(p.rstrip("/").rsplit("/", 1)[-1]) for p in get_checkpoints(save_dir)]


def test_prune_keeps_last_milestones_best_and_unevaluated(save_dir: str) -> None:
    fill(save_dir, [100, 200, 300, 400, 500, 600])
    for step, loss in {100: 0.5, 200: 0.1, 300: 0.9, 400: 0.8}.items():
        write_checkpoint_metrics(f"{save_dir}/{step}", {"loss": loss})
    assert read_checkpoint_metrics(f"{save_dir}/200") == {"loss": 0.1}
    mark_done_eval(f"{save_dir}/400", "val")
    policy = RetentionPolicy(
        keep_last=1,
        keep_every_steps=300,
        keep_best=1,
        best_metric="loss",
        keep_until_evaluated=["val"],
    )
    dry = prune(save_dir, policy.model_copy(update={"keep_until_evaluated": []}), dry_run=True)
    assert [c.step for c in dry.plan.delete] == [100, 400, 500]
    assert steps_in(save_dir) == [100, 200, 300, 400, 500, 600]  # dry run deleted nothing
    result = prune(save_dir, policy)
    # 600 last, 300 & 600 milestones, 200 best loss; 100, 200, 300, 500, 600 not evaluated on val
    assert [c.step for c in result.plan.delete] == [400]
    assert steps_in(save_dir) == [100, 200, 300, 500, 600]
    fs, root = fsspec.core.url_to_fs(save_dir)
    assert not fs.exists(f"{root}/400")  # gone entirely, not just uncommitted


def test_prune_never_deletes_the_newest_valid_one(tmp_path: Path) -> None:
    save_dir = str(tmp_path)
    fill(save_dir, [1, 2, 3])
    (tmp_path / "3" / ".snapshot_metadata").write_text("garbage: [")  # newest is corrupt
    result = prune(save_dir, RetentionPolicy(keep_last=1))
    assert result.latest_valid == str(tmp_path / "2")
    assert steps_in(save_dir) == [2, 3]


def test_prune_with_nothing_valid_deletes_nothing(tmp_path: Path) -> None:
    fill(str(tmp_path), [1, 2])
    for step in (1, 2):
        (tmp_path / str(step) / ".snapshot_metadata").write_text("garbage: [")
    result = prune(str(tmp_path), RetentionPolicy(keep_last=1))
    assert result.deleted == [] and steps_in(str(tmp_path)) == [1, 2]


def test_prune_refuses_a_checkpoint_as_save_dir(tmp_path: Path) -> None:
    fill(str(tmp_path), [1])
    with pytest.raises(NotASaveDirError):
        prune(str(tmp_path / "1"), RetentionPolicy(keep_last=1))
    with pytest.raises(NotASaveDirError):
        find_incomplete(str(tmp_path / "1"), 0)
    assert verify_checkpoint(str(tmp_path / "1")).ok


def test_async_save_in_flight_and_prune(save_dir: str) -> None:
    """The checkpoint being written is never pruned, nor is the newest valid one."""
    fill(save_dir, [1, 2])
    data_written = threading.Event()
    release = threading.Event()

    def gate(event: Event) -> None:
        if event.name == SAVE_DATA_WRITTEN:  # every data file is stored; the marker is not
            data_written.set()
            assert release.wait(60)  # the writer (thread or process) waits here

    subscribe(gate)
    snapshot = Snapshot(save_dir, make_state())
    pending = snapshot.save(3)
    assert data_written.wait(60)
    result = prune(save_dir, RetentionPolicy(keep_last=1))
    assert result.latest_valid.endswith("/2")
    assert steps_in(save_dir) == [2]
    assert [c.step for c in result.plan.keep] == [2, 3]  # 3 kept as incomplete
    release.set()
    assert pending.wait().endswith("/3")
    unsubscribe(gate)
    assert verify_checkpoint(pending.path, level="full").status == "valid"
    prune(save_dir, RetentionPolicy(keep_last=1))
    assert steps_in(save_dir) == [3]


# -- stale incomplete directories --------------------------------------------------------------


def test_clean_incomplete_only_removes_old_ones(tmp_path: Path) -> None:
    fill(str(tmp_path), [1])
    old, young = tmp_path / "5", tmp_path / "6"
    for directory in (old, young):
        (directory / "0" / "model").mkdir(parents=True)
        (directory / "0" / "model" / "weight").write_bytes(b"x" * 10)
    two_hours_ago = time.time() - 7200
    for path in (old, old / "0", old / "0" / "model", old / "0" / "model" / "weight"):
        os.utime(path, (two_hours_ago, two_hours_ago))
    found = find_incomplete(str(tmp_path), 3600)
    assert [e.step for e in found] == [5] and found[0].age_s >= 7199
    assert [e.step for e in clean_incomplete(str(tmp_path), 3600, dry_run=True)] == [5]
    assert old.exists()
    assert [e.step for e in clean_incomplete(str(tmp_path), 3600)] == [5]
    assert not old.exists() and young.exists() and (tmp_path / "1").exists()
    with pytest.raises(InvalidArgumentError):
        find_incomplete(str(tmp_path), -1)


def test_clean_incomplete_on_s3(s3_save_dir: str) -> None:
    fill(s3_save_dir, [1])
    fs = fsspec.filesystem("s3")
    fs.pipe_file(f"{s3_save_dir}/2/0/model/weight", b"x" * 10)
    found = find_incomplete(s3_save_dir, 0)
    assert [e.step for e in found] == [2] and found[0].size == 10
    assert find_incomplete(s3_save_dir, 3600) == []  # just written: too young
    assert [e.step for e in clean_incomplete(s3_save_dir, 0)] == [2]
    assert get_latest_valid_checkpoint(s3_save_dir).endswith("/1")
    assert find_incomplete(s3_save_dir, 0) == []
