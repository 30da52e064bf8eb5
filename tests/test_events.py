"""Library events: each is emitted at the moment its docs name, in order, on every backend.

The crash tests pause processes at these events and then judge the files, so what the files
look like *at* each event is checked here, from inside the subscriber, as it happens.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
import torch

from tml_checkpointing import (
    DELETE_DONE,
    DELETE_STARTED,
    DELETE_UNCOMMITTED,
    EVENT_NAMES,
    INCOMPLETE_REMOVED,
    QUARANTINED,
    SAVE_COMMITTED,
    SAVE_DATA_WRITTEN,
    SAVE_FAILED,
    SAVE_SIDECAR_WRITTEN,
    SAVE_STARTED,
    CheckpointWriteError,
    Event,
    RetentionPolicy,
    Snapshot,
    clean_incomplete,
    emit,
    is_committed,
    join_url,
    prune,
    quarantine_checkpoint,
    subscribe,
    unsubscribe,
)
from tml_checkpointing.format.layout import INTEGRITY_SIDECAR, is_data_file


class Recorder:
    """Records each event with what storage looked like at that moment."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, bool, bool, int]] = []
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if event.name in (QUARANTINED, INCOMPLETE_REMOVED):
            return
        fs, root = fsspec.core.url_to_fs(event.path)
        fs.invalidate_cache()
        try:
            files = [f[len(root.rstrip("/")) + 1 :] for f in fs.find(root)]
        except FileNotFoundError:
            files = []
        self.seen.append(
            (
                event.name,
                event.path,
                is_committed(event.path),
                INTEGRITY_SIDECAR in files,
                sum(1 for f in files if is_data_file(f)),
            )
        )


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    recording = Recorder()
    subscribe(recording)
    try:
        yield recording
    finally:
        unsubscribe(recording)


def test_a_save_and_a_prune_report_each_moment_with_storage_in_that_state(
    recorder: Recorder, save_dir: str
) -> None:
    snapshot = Snapshot(save_dir, {"model": torch.nn.Linear(8, 8)})
    for step in range(3):
        snapshot.save(step).wait()
    first, third = join_url(save_dir, "0"), join_url(save_dir, "2")
    seen = [s for s in recorder.seen if s[1] == third]
    assert [s[0] for s in seen] == [
        SAVE_STARTED,
        SAVE_DATA_WRITTEN,
        SAVE_SIDECAR_WRITTEN,
        SAVE_COMMITTED,
    ]
    started, data, sidecar, committed = seen
    assert started[2:] == (False, False, 0)  # nothing stored yet
    assert data[2:4] == (False, False) and data[4] > 0  # data stored, sidecar and marker not
    assert sidecar[2:] == (False, True, data[4])  # sidecar too, still uncommitted
    assert committed[2:] == (True, True, data[4])
    assert recorder.events[0].fields == {"path": first, "step": 0}

    recorder.seen.clear()
    prune(save_dir, RetentionPolicy(keep_last=2))
    assert [s[:3] for s in recorder.seen] == [
        (DELETE_STARTED, first, True),  # nothing removed yet
        (DELETE_UNCOMMITTED, first, False),  # marker gone...
        (DELETE_DONE, first, False),
    ]
    assert recorder.seen[1][4] == data[4]  # ...all data still there
    assert recorder.seen[2][3:] == (False, 0)  # then everything


def test_a_failing_subscriber_is_logged_and_the_save_commits(
    recorder: Recorder, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(event: Event) -> None:
        raise RuntimeError("listener bug")

    subscribe(broken)
    try:
        with caplog.at_level(logging.ERROR, logger="tml_checkpointing.events"):
            path = Snapshot(str(tmp_path), {"m": torch.nn.Linear(2, 2)}).save(5).wait()
    finally:
        unsubscribe(broken)
    assert is_committed(path)
    assert [e.name for e in recorder.events][-1] == SAVE_COMMITTED  # later subscribers still run
    failures = [r for r in caplog.records if "listener bug" in (r.exc_text or str(r.exc_info))]
    assert len(failures) == 4, caplog.text  # one per event of the save


def test_unsubscribed_callbacks_hear_nothing(tmp_path: Path) -> None:
    heard: list[Event] = []
    subscribe(heard.append)
    unsubscribe(heard.append)
    unsubscribe(heard.append)  # twice: ignored
    emit(SAVE_STARTED, path="x", step=1)
    Snapshot(str(tmp_path), {"m": torch.nn.Linear(2, 2)}).save(1).wait()
    assert heard == []
    assert len(set(EVENT_NAMES)) == len(EVENT_NAMES) == 13


def test_a_failed_save_is_reported_once(recorder: Recorder, memory_save_dir: str) -> None:
    """The data files vanish while the marker is pending (as under a racing cleanup): the save
    fails instead of committing, and says so once however often it is waited on."""
    fs = fsspec.filesystem("memory")

    def remove_data(event: Event) -> None:
        if event.name == SAVE_DATA_WRITTEN:
            _, root = fsspec.core.url_to_fs(event.path)
            for name in fs.find(root):
                if is_data_file(name[len(root) + 1 :]):
                    fs.rm_file(name)

    subscribe(remove_data)
    try:
        pending = Snapshot(memory_save_dir, {"m": torch.nn.Linear(2, 2)}).save(3)
        for _ in range(2):
            with pytest.raises(CheckpointWriteError):
                pending.wait()
    finally:
        unsubscribe(remove_data)
    names = [e.name for e in recorder.events]
    assert names == [SAVE_STARTED, SAVE_DATA_WRITTEN, SAVE_FAILED]
    failed = recorder.events[-1]
    assert failed.fields["step"] == 3 and "CheckpointWriteError" in failed.fields["error"]
    assert not is_committed(failed.path)


def test_quarantine_and_clean_incomplete_report_what_they_moved_or_removed(
    recorder: Recorder, tmp_path: Path
) -> None:
    save_dir = str(tmp_path)
    snapshot = Snapshot(save_dir, {"m": torch.nn.Linear(2, 2)})
    moved_from = snapshot.save(1).wait()
    target = quarantine_checkpoint(moved_from)
    fs = fsspec.filesystem("file")
    fs.makedirs(join_url(save_dir, "2", "0"))
    fs.pipe_file(join_url(save_dir, "2", "0", "leftover"), b"x")
    clean_incomplete(save_dir, 0)
    quarantined = [e for e in recorder.events if e.name == QUARANTINED]
    assert [dict(e.fields) for e in quarantined] == [
        {"path": moved_from, "target": target, "reason": "corrupt"}
    ]
    removed = [e.path for e in recorder.events if e.name == INCOMPLETE_REMOVED]
    assert removed == [join_url(save_dir, "2")]
