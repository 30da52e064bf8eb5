"""Listing and picking checkpoints: ordering, junk, half-written ones, bad input, URLs."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from tml_checkpointing import (
    CheckpointNotFoundError,
    InvalidCheckpointPathError,
    NotACheckpointDirectoryError,
    Snapshot,
    UnsupportedProtocolError,
    checkpoints_iterator,
    get_checkpoint,
    get_checkpoints,
    scan_checkpoints,
    step_from_checkpoint,
)
from tml_checkpointing.storage.filesystem import join_url, resolve


def put_file(url: str, data: bytes) -> None:
    fs, path = resolve(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, data)


def _save_steps(save_dir: str, steps: list[int]) -> None:
    with Snapshot(save_dir, {"model": torch.nn.Linear(2, 2)}) as snapshot:
        for step in steps:
            snapshot.save(step)


def test_numeric_order_and_scheme_kept(save_dir: str) -> None:
    _save_steps(save_dir, [100, 2, 10])
    assert get_checkpoints(save_dir) == [join_url(save_dir, s) for s in ("2", "10", "100")]
    assert get_checkpoint(save_dir) == join_url(save_dir, "100")
    assert get_checkpoint(save_dir, 10) == join_url(save_dir, "10")
    scheme = save_dir.split("://")[0] + "://" if "://" in save_dir else "/"
    assert all(path.startswith(scheme) for path in get_checkpoints(save_dir))


def test_junk_and_half_written_entries_are_ignored(save_dir: str) -> None:
    _save_steps(save_dir, [5])
    for relative, data in [
        (".DS_Store", b"junk"),
        ("notes.txt", b"junk"),
        ("tmp-123/file", b"junk"),
        ("12abc/file", b"junk"),
        ("-1/.snapshot_metadata", b"manifest"),
        ("7", b"a file named like a step"),
        ("30/0/model/weight", b"data without a commit marker"),
        ("40/.snapshot_metadata", b""),  # torchsnapshot killed while writing its marker
    ]:
        put_file(join_url(save_dir, relative), data)
    assert get_checkpoints(save_dir) == [join_url(save_dir, "5")]
    incomplete = [c.step for c in scan_checkpoints(save_dir) if not c.committed]
    assert incomplete == [30, 40]


def test_missing_save_dir_has_no_checkpoints(tmp_path: Path, memory_save_dir: str) -> None:
    assert get_checkpoints(str(tmp_path / "nope")) == []
    assert get_checkpoints(memory_save_dir) == []
    assert get_checkpoint(str(tmp_path / "nope"), missing_ok=True) == ""


def test_missing_s3_prefix_has_no_checkpoints(s3_save_dir: str) -> None:
    assert get_checkpoints(s3_save_dir) == []


def test_save_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(NotACheckpointDirectoryError, match="is a file"):
        get_checkpoints(str(path))


def test_no_checkpoint_error_names_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="no committed checkpoint") as caught:
        get_checkpoint(str(tmp_path))
    assert str(tmp_path) in str(caught.value)
    assert isinstance(caught.value, FileNotFoundError)


def test_missing_step_error_names_step_and_existing_steps(tmp_path: Path) -> None:
    _save_steps(str(tmp_path), [1, 3])
    with pytest.raises(CheckpointNotFoundError, match=r"step 2 .*committed steps: 1, 3"):
        get_checkpoint(str(tmp_path), 2)
    assert get_checkpoint(str(tmp_path), 2, missing_ok=True) == ""


@pytest.mark.parametrize(
    ("path", "step"),
    [
        ("/a/b/100", 100),
        ("/a/b/100/", 100),
        ("s3://bucket/run/7", 7),
        ("memory://x/0", 0),
        ("42", 42),
    ],
)
def test_step_from_checkpoint(path: str, step: int) -> None:
    assert step_from_checkpoint(path) == step


@pytest.mark.parametrize("path", ["/a/b/latest", "s3://bucket/run/", "/a/-3", "/a/1.5", ""])
def test_step_from_checkpoint_rejects_non_steps(path: str) -> None:
    with pytest.raises(InvalidCheckpointPathError, match="non-negative integer step"):
        step_from_checkpoint(path)


def test_unknown_protocol_is_named() -> None:
    with pytest.raises(UnsupportedProtocolError, match="'nosuchproto'"):
        get_checkpoints("nosuchproto://bucket/run")
    with pytest.raises(ValueError):
        Snapshot("nosuchproto://bucket/run")


def test_iterator_yields_every_new_checkpoint_in_order(save_dir: str) -> None:
    """Checkpoints written while the follower runs are all seen, none skipped."""
    _save_steps(save_dir, [1, 2])
    model = torch.nn.Linear(2, 2)
    seen: list[str] = []
    wrote_more = threading.Event()

    def write_two_more() -> None:
        with Snapshot(save_dir, {"model": model}) as snapshot:
            snapshot.save(3)
            snapshot.save(4)
        wrote_more.set()

    writer = threading.Thread(target=write_two_more)
    for checkpoint in checkpoints_iterator(save_dir, seconds_to_sleep=0.05, timeout=3):
        seen.append(checkpoint)
        if len(seen) == 2:
            writer.start()
            wrote_more.wait(timeout=60)
    writer.join()
    assert [step_from_checkpoint(c) for c in seen] == [1, 2, 3, 4]


def test_iterator_stops_after_timeout_and_respects_start(tmp_path: Path) -> None:
    _save_steps(str(tmp_path), [1, 2, 3])
    seen = list(checkpoints_iterator(str(tmp_path), 0.01, 0.05, start_after_step=1))
    assert [step_from_checkpoint(c) for c in seen] == [2, 3]
    assert list(checkpoints_iterator(str(tmp_path / "empty"), 0.01, 0.05)) == []
