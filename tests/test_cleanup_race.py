"""Cleanup never races a live save, from both sides.

The save is held at "data written, marker pending" by an event subscriber (the writer thread
runs the subscriber, so the save waits right there), and the other side acts at that moment:
``clean_incomplete`` (in this process and from another one) must leave the claimed step alone,
and a save whose files were removed anyway must fail instead of committing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import fsspec
import pytest
import torch

from tml_checkpointing import (
    CheckpointWriteError,
    Snapshot,
    clean_incomplete,
    events,
    find_incomplete,
    get_latest_valid_checkpoint,
    is_committed,
    verify_checkpoint,
)
from tml_checkpointing.format.layout import SAVE_CLAIM

REPO = Path(__file__).resolve().parents[1]


def state() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {"model": torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 8))}


@pytest.fixture
def at_data_written() -> Iterator[Callable[[Callable[[str], None]], None]]:
    """Run an action once, in the writer thread, when a save's data is written."""
    subscribed: list[Callable[[events.Event], None]] = []

    def install(action: Callable[[str], None]) -> None:
        done: list[bool] = []

        def callback(event: events.Event) -> None:
            if event.name == events.SAVE_DATA_WRITTEN and not done:
                done.append(True)
                action(event.path)

        events.subscribe(callback)
        subscribed.append(callback)

    yield install
    for callback in subscribed:
        events.unsubscribe(callback)


def leftover_of_a_dead_writer(save_dir: str, step: int) -> str:
    """An uncommitted step claimed by a process that no longer exists."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    path = f"{save_dir}/{step}"
    fs, root = fsspec.core.url_to_fs(path)
    fs.mkdirs(f"{root}/0/model", exist_ok=True)  # no-op on object stores
    fs.pipe_file(f"{root}/0/model/weight", b"half a tensor")
    claim = {"host": os.uname().nodename, "pid": int(dead.stdout), "started_at": 0.0}
    fs.pipe_file(f"{root}/{SAVE_CLAIM}", json.dumps(claim).encode())
    return path


def test_clean_incomplete_leaves_a_live_save_alone(
    save_dir: str, at_data_written: Callable[[Callable[[str], None]], None]
) -> None:
    snapshot = Snapshot(save_dir, state())
    snapshot.save(1).wait()
    dead = leftover_of_a_dead_writer(save_dir, 5)
    seen: dict[str, object] = {}

    def clean_now(path: str) -> None:
        seen["claimed"] = [e.claimed_by for e in find_incomplete(save_dir, 0) if e.path == path]
        seen["removed"] = [e.path for e in clean_incomplete(save_dir, older_than_s=0)]

    at_data_written(clean_now)
    committed = snapshot.save(2).wait()
    assert seen["removed"] == [dead]  # the dead writer's leftovers go, the live save stays
    assert seen["claimed"] == []  # a live claim is not even listed as removable
    assert is_committed(committed)
    assert verify_checkpoint(committed, level="full").status == "valid"
    fs, root = fsspec.core.url_to_fs(committed)
    assert not fs.exists(f"{root}/{SAVE_CLAIM}")  # the commit removed its claim


def test_a_save_whose_files_were_removed_fails_instead_of_committing(
    save_dir: str, at_data_written: Callable[[Callable[[str], None]], None]
) -> None:
    snapshot = Snapshot(save_dir, state())
    first = snapshot.save(1).wait()

    def remove_data(path: str) -> None:  # what `rm -r` or an unaware cleanup would do
        fs, root = fsspec.core.url_to_fs(path)
        for name in fs.find(root):
            if SAVE_CLAIM not in name:
                fs.rm_file(name)

    at_data_written(remove_data)
    pending = snapshot.save(2)
    with pytest.raises(CheckpointWriteError, match="removed or changed while it was being"):
        pending.wait()
    assert not is_committed(f"{save_dir}/2")
    assert get_latest_valid_checkpoint(save_dir) == first


def test_clean_incomplete_from_another_process_leaves_a_live_save_alone(
    tmp_path: Path, at_data_written: Callable[[Callable[[str], None]], None]
) -> None:
    save_dir = str(tmp_path / "run")
    snapshot = Snapshot(save_dir, state())
    results: list[subprocess.CompletedProcess[str]] = []

    def other_process_cleans(_: str) -> None:
        command = [sys.executable, "-m", "tml_checkpointing.cli", "checkpoints",
                   "clean-incomplete", save_dir, "--older-than", "0", "--json"]  # fmt: skip
        results.append(subprocess.run(command, capture_output=True, text=True, cwd=REPO))

    at_data_written(other_process_cleans)
    committed = snapshot.save(3).wait()
    (result,) = results
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["removed"] == []
    assert verify_checkpoint(committed, level="full").status == "valid"
