"""Integrity sidecar, verification, corruption handling and resume from the newest valid one."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import fsspec
import pytest
import torch
import torchsnapshot

from tml_checkpointing import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    Snapshot,
    get_latest_valid_checkpoint,
    verify_checkpoint,
)
from tml_checkpointing.format.layout import INTEGRITY_SIDECAR as INTEGRITY_FNAME

from .conftest import S3Server


def make_state(seed: int = 0) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    return {"model": torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))}


def largest_data_file(checkpoint: str) -> str:
    """The biggest file recorded in the sidecar, relative to the checkpoint."""
    with fsspec.open(f"{checkpoint}/{INTEGRITY_FNAME}", "rb") as handle:
        files = json.load(handle)["files"]
    return max(files, key=lambda name: files[name]["size"])


def save_two(save_dir: str) -> tuple[dict, str, str]:
    state = make_state()
    with Snapshot(save_dir, state) as snapshot:
        first = snapshot.save(1).wait()
        with torch.no_grad():
            state["model"][0].weight.add_(1.0)
        second = snapshot.save(2).wait()
    return state, first, second


def test_sidecar_records_every_data_file_and_verifies(save_dir: str) -> None:
    _, _, checkpoint = save_two(save_dir)
    fs, root = fsspec.core.url_to_fs(checkpoint)
    sidecar = json.loads(fs.cat_file(f"{root}/{INTEGRITY_FNAME}"))
    assert sidecar["version"] == 2 and sidecar["algorithm"] == "xxh3_64"
    block = sidecar["block_size"]
    for name, entry in sidecar["files"].items():
        assert fs.size(f"{root}/{name}") == entry["size"]
        assert len(entry["blocks"]) == max(1, -(-entry["size"] // block))
    assert not any(name.startswith(".snapshot_metadata") for name in sidecar["files"])
    for level in ("size", "full"):
        report = verify_checkpoint(checkpoint, level=level)
        assert report.status == "valid", report.problems
        assert report.files_checked == len(sidecar["files"])
    assert verify_checkpoint(checkpoint, level="full").bytes_checked > 0


def test_truncated_file_is_caught_by_size_check_and_resume_falls_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    save_dir = str(tmp_path)
    _, first, second = save_two(save_dir)
    victim = largest_data_file(second)
    path = Path(second) / victim
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptCheckpointError, match="truncated") as caught:
        Snapshot(save_dir, make_state(1)).restore(second)
    assert caught.value.path == victim and victim in str(caught.value)
    with caplog.at_level(logging.WARNING, logger="tml_checkpointing"):
        assert get_latest_valid_checkpoint(save_dir) == first
    assert any(second in r.getMessage() and victim in r.getMessage() for r in caplog.records)
    assert Path(second).exists()  # nothing deleted automatically
    restored = make_state(1)
    Snapshot(save_dir, restored).restore(first)
    assert torch.equal(restored["model"][0].weight, make_state()["model"][0].weight)


def test_flipped_byte_is_caught_by_a_default_restore(save_dir: str) -> None:
    """Same size, one bit changed: only checksums see it, and a default restore hashes every
    byte it reads."""
    _, first, second = save_two(save_dir)
    victim = largest_data_file(second)
    fs, root = fsspec.core.url_to_fs(second)
    data = bytearray(fs.cat_file(f"{root}/{victim}"))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(f"{root}/{victim}", bytes(data))
    assert verify_checkpoint(second, level="size").status == "valid"  # same size
    report = verify_checkpoint(second, level="full", raise_on_corrupt=False)
    assert report.status == "corrupt" and report.problems[0].path == victim
    with pytest.raises(CorruptCheckpointError, match=victim) as caught:
        Snapshot(save_dir, make_state(1)).restore(second)
    assert caught.value.path == victim and caught.value.checkpoint == second
    assert get_latest_valid_checkpoint(save_dir, verify="full") == first
    Snapshot(save_dir, make_state(1)).restore(second, verify="size")  # the caller's choice


def test_garbage_marker_is_corrupt_and_resume_skips_it(tmp_path: Path) -> None:
    _, first, second = save_two(str(tmp_path))
    (Path(second) / ".snapshot_metadata").write_text("{manifest: [")  # half-written YAML
    with pytest.raises(CorruptCheckpointError, match="commit marker unreadable"):
        verify_checkpoint(second)
    assert get_latest_valid_checkpoint(str(tmp_path)) == first


def test_missing_file_is_corrupt_even_without_sidecar(tmp_path: Path) -> None:
    _, _, second = save_two(str(tmp_path))
    victim = largest_data_file(second)
    (Path(second) / INTEGRITY_FNAME).unlink()
    assert verify_checkpoint(second).status == "unverified"
    (Path(second) / victim).unlink()
    with pytest.raises(CorruptCheckpointError, match="named by the torchsnapshot manifest"):
        verify_checkpoint(second)


def test_plain_torchsnapshot_checkpoint_is_unverified_and_restores(tmp_path: Path) -> None:
    state = make_state()
    torchsnapshot.Snapshot.take(str(tmp_path / "5"), {"model": state["model"]})
    report = verify_checkpoint(str(tmp_path / "5"), level="full")
    assert report.status == "unverified" and report.ok
    restored = make_state(1)
    Snapshot(str(tmp_path), restored).restore(str(tmp_path / "5"), keys=["model"])
    assert torch.equal(restored["model"][1].bias, state["model"][1].bias)
    assert get_latest_valid_checkpoint(str(tmp_path)) == str(tmp_path / "5")


def test_no_valid_checkpoint(tmp_path: Path) -> None:
    assert get_latest_valid_checkpoint(str(tmp_path / "nothing")) == ""
    _, first, second = save_two(str(tmp_path))
    for checkpoint in (first, second):
        (Path(checkpoint) / ".snapshot_metadata").write_bytes(b"\x00garbage")
    assert get_latest_valid_checkpoint(str(tmp_path)) == ""
    with pytest.raises(CheckpointNotFoundError, match="corrupt"):
        get_latest_valid_checkpoint(str(tmp_path), missing_ok=False)
    with pytest.raises(CheckpointNotFoundError, match="not a committed checkpoint"):
        verify_checkpoint(str(tmp_path / "77"))


def test_size_verify_on_s3_is_one_listing(s3_server: S3Server, s3_save_dir: str) -> None:
    _, _, checkpoint = save_two(s3_save_dir)
    before = s3_server.request_count()
    assert verify_checkpoint(checkpoint).status == "valid"
    # one recursive listing + the marker + the sidecar, never a request per file
    assert s3_server.request_count() - before <= 4


def test_reader_sees_a_checkpoint_rewritten_by_another_process(s3_save_dir: str) -> None:
    """s3fs caches every directory a ``find`` walked; a listing of ``<step>/batched`` taken
    while a killed save's leftovers were there must not hide the files of the re-save."""
    writer_options = {"skip_instance_cache": True}  # another process: its own s3fs instance
    leftovers = fsspec.filesystem("s3", skip_instance_cache=True)
    leftovers.pipe_file(f"{s3_save_dir}/1/batched/leftover-of-a-killed-save", b"x" * 10)
    assert get_latest_valid_checkpoint(s3_save_dir, verify="full") == ""  # reader caches it
    state = make_state()
    Snapshot(s3_save_dir, state, storage_options=writer_options).save(1).wait()
    assert get_latest_valid_checkpoint(s3_save_dir, verify="full") == f"{s3_save_dir}/1"


def test_quarantine_moves_a_checkpoint_aside_without_losing_it(save_dir: str) -> None:
    import torch

    from tml_checkpointing import Snapshot, get_checkpoints, quarantine_checkpoint
    from tml_checkpointing.storage.filesystem import resolve

    with Snapshot(save_dir, {"model": torch.nn.Linear(2, 2)}) as snapshot:
        snapshot.save(1)
        snapshot.save(2)
    moved = quarantine_checkpoint(f"{save_dir}/2")
    assert moved.startswith(f"{save_dir}/2.corrupt-")
    assert get_checkpoints(save_dir) == [f"{save_dir}/1"]
    fs, path = resolve(moved)
    assert fs.size(f"{path}/.snapshot_metadata") > 0  # all of it is still there
    assert fs.exists(f"{path}/.integrity.json")
