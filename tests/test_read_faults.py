"""Unreadable is not corrupt: storage faults raise CheckpointReadError and never skip, move
aside or delete a checkpoint; bytes read and found wrong are CorruptCheckpointError.

Faults come from ``faulty://`` (tests/helpers/faulty_fs.py): real files on disk, reached through
fsspec, with chosen operations on chosen paths failing as a network or a permission problem
would. The same cases run through verify, list, latest-valid, restore, prune,
clean-incomplete, the CLI (a subprocess) and the training flow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tml_checkpointing import (
    CheckpointReadError,
    CorruptCheckpointError,
    RetentionPolicy,
    Snapshot,
    clean_incomplete,
    get_checkpoint,
    get_checkpoints,
    get_latest_valid_checkpoint,
    list_checkpoints,
    prune,
    verify_checkpoint,
)
from tml_checkpointing.format.layout import INTEGRITY_SIDECAR

from .conftest import PrefectServer
from .helpers import faulty_fs
from .helpers.faulty_fs import Fault
from .training_helpers import flow_params

REPO = Path(__file__).resolve().parents[1]
ERRORS = ["PermissionError", "ConnectionResetError", "TimeoutError"]


@pytest.fixture(autouse=True)
def no_faults_left() -> Iterator[None]:
    faulty_fs.clear()
    yield
    faulty_fs.clear()


def model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 4))


def three_checkpoints(tmp_path: Path) -> tuple[str, Path]:
    """Steps 1, 2, 3 (weights differ per step) under a faulty:// save_dir."""
    disk = tmp_path / "run"
    save_dir = faulty_fs.url(disk)
    net = model(0)
    with Snapshot(save_dir, {"model": net}) as snapshot:
        for step in (1, 2, 3):
            with torch.no_grad():
                net[0].weight.fill_(float(step))
            snapshot.save(step).wait()
    return save_dir, disk


def biggest_data_file(checkpoint: Path) -> str:
    files = json.loads((checkpoint / INTEGRITY_SIDECAR).read_text())["files"]
    return str(max(files, key=lambda name: files[name]["size"]))


@pytest.mark.parametrize("error", ERRORS)
def test_unreadable_sidecar_is_a_read_error_not_corruption(tmp_path: Path, error: str) -> None:
    save_dir, disk = three_checkpoints(tmp_path)
    faulty_fs.install(Fault("read", f"*/3/{INTEGRITY_SIDECAR}", error))
    with pytest.raises(CheckpointReadError, match=error) as caught:
        verify_checkpoint(f"{save_dir}/3")
    assert isinstance(caught.value, OSError)
    assert not isinstance(caught.value, CorruptCheckpointError)
    # Resume must not silently fall back to step 2 because step 3 could not be read.
    with pytest.raises(CheckpointReadError):
        get_latest_valid_checkpoint(save_dir)
    with pytest.raises(CheckpointReadError):
        prune(save_dir, RetentionPolicy(keep_last=1))
    assert sorted(os.listdir(disk)) == ["1", "2", "3"]  # nothing deleted or moved aside
    faulty_fs.clear()
    assert get_latest_valid_checkpoint(save_dir) == f"{save_dir}/3"


@pytest.mark.parametrize("error", ERRORS)
def test_listing_fault_is_never_an_empty_save_dir(tmp_path: Path, error: str) -> None:
    save_dir, disk = three_checkpoints(tmp_path)
    (disk / "4").mkdir()  # an incomplete one, old enough for clean-incomplete
    faulty_fs.install(Fault("list", str(disk), error))
    for call in (
        lambda: get_checkpoints(save_dir),
        lambda: get_checkpoint(save_dir, missing_ok=True),
        lambda: list_checkpoints(save_dir),
        lambda: clean_incomplete(save_dir, older_than_s=0),
    ):
        with pytest.raises(CheckpointReadError, match="could not read"):
            call()
    assert sorted(os.listdir(disk)) == ["1", "2", "3", "4"]


@pytest.mark.parametrize("error", ERRORS)
def test_restore_read_fault_is_a_read_error(tmp_path: Path, error: str) -> None:
    save_dir, disk = three_checkpoints(tmp_path)
    victim = biggest_data_file(disk / "3")
    faulty_fs.install(Fault("read", f"*/3/{victim}", error))
    with pytest.raises(CheckpointReadError, match=error):
        Snapshot(save_dir, {"model": model(1)}).restore(f"{save_dir}/3")
    faulty_fs.clear()
    restored = model(1)
    Snapshot(save_dir, {"model": restored}).restore(f"{save_dir}/3")
    assert torch.all(restored[0].weight == 3.0)


def test_flipped_bit_is_corrupt_and_a_read_fault_next_to_it_is_not(tmp_path: Path) -> None:
    """Both on the same checkpoint: what was read and is wrong is corrupt, the rest is a fault."""
    save_dir, disk = three_checkpoints(tmp_path)
    relative = biggest_data_file(disk / "3")
    victim = disk / "3" / relative
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0x10
    victim.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError) as caught:
        Snapshot(save_dir, {"model": model(1)}).restore(f"{save_dir}/3")
    assert caught.value.path == relative
    faulty_fs.install(Fault("read", f"*/3/{relative}", "ConnectionResetError"))
    with pytest.raises(CheckpointReadError):
        Snapshot(save_dir, {"model": model(1)}).restore(f"{save_dir}/3")


def run_cli(*args: str, faults: tuple[Fault, ...]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **faulty_fs.env_for(*faults), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "tests.helpers.faulty_fs", "tml_checkpointing.cli", *args],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120,
    )  # fmt: skip


def test_cli_verify_and_list_exit_3_on_read_faults(tmp_path: Path) -> None:
    save_dir, _ = three_checkpoints(tmp_path)
    fault = Fault("read", f"*/3/{INTEGRITY_SIDECAR}", "PermissionError")
    verify = run_cli("checkpoints", "verify", save_dir, "--json", faults=(fault,))
    assert verify.returncode == 3, verify.stdout + verify.stderr
    payload = json.loads(verify.stdout)
    assert payload["exit_code"] == 3 and "PermissionError" in payload["error"]
    assert "Traceback" not in verify.stderr
    listing = run_cli("checkpoints", "list", save_dir, "--json", faults=(fault,))
    assert listing.returncode == 3 and json.loads(listing.stdout)["exit_code"] == 3
    healthy = run_cli("checkpoints", "verify", save_dir, "--json", faults=())
    assert healthy.returncode == 0 and json.loads(healthy.stdout)["ok"] is True


def test_training_flow_never_moves_aside_or_retrains_over_an_unreadable_checkpoint(
    prefect_api: PrefectServer, tmp_path: Path
) -> None:
    """The user's case: the newest sidecar unreadable, then `tml train` on that dir."""
    from flows.train import train

    disk = tmp_path / "run"
    save_dir = faulty_fs.url(disk)
    params = {"save_dir": save_dir, "steps_per_epoch": 3, "batch_size": 32, "seed": 5}
    assert train(*flow_params(epochs=2, **params)).final_step == 6
    before = {p.name: p.stat().st_mtime_ns for p in (disk / "6").rglob("*") if p.is_file()}
    faulty_fs.install(Fault("read", f"*/6/{INTEGRITY_SIDECAR}", "PermissionError"))
    state = train(*flow_params(epochs=3, epoch_retries=0, **params), return_state=True)
    assert state.is_failed()
    with pytest.raises(CheckpointReadError):
        state.result()
    assert sorted(p.name for p in disk.iterdir() if p.name[0].isdigit()) == ["3", "6"]
    after = {p.name: p.stat().st_mtime_ns for p in (disk / "6").rglob("*") if p.is_file()}
    assert after == before  # checkpoint 6 untouched: not moved aside, not rewritten
    faulty_fs.clear()
    resumed = train(*flow_params(epochs=3, **params))
    assert (resumed.epochs_skipped, resumed.epochs_run) == ([0, 1], [2])
    assert resumed.resumed_from == f"{save_dir}/6"
